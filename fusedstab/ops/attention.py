"""Scaled dot-product attention (FlashAttention forward and backward) as torch.library custom ops.

``fusedstab::attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed, offset) -> (o, lse)``
``fusedstab::attention_bwd(do, q, k, v, o, lse, mask, causal, scale, dropout_p, seed, offset,
  mask_needs_grad) -> (dq, dk, dv, dmask)``

q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) with any strides, Hq a multiple of Hkv (grouped-
query attention); mask None or a (B, Hq, L, S) view (expanded: stride 0 on broadcast dims), bool (True
takes part) or additive float; causal: query i sees key j iff j <= i. o (B, Hq, L, Ev) is laid out as
q's (B, Hq, L) dims are; lse (B, Hq, L) is the natural-log logsumexp of the masked, scaled scores in
the accumulation dtype, -inf on fully masked rows (whose o is 0 and whose gradients are 0). Dropout
keeps probability (b, h, i, j) by a counter-based RNG of (seed, offset, index), so backward regenerates
the forward's mask. dmask is the (B, Hq, L, S) gradient of an additive mask (in the accumulation dtype)
when mask_needs_grad, else empty.

What every backend may assume (and the C++ kernels check): B, Hq, L, S, E, Ev >= 1; q, k, v (and o,
do in backward) with a unit-stride last dim, any other strides; o, dq, dk, dv written through their
(given) strides; lse contiguous; dmask zero-filled when asked for, else empty.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..numerics import acc_dtype, unsupported


def _o_like(q: Tensor, Ev: int) -> Tensor:
    """Empty (B, Hq, L, Ev) in q's dtype, its (B, Hq, L) dims in q's memory order, head dim innermost
    (q taken as a (B, L, H, E).transpose(1, 2) view gives o in (B, L, H, Ev) memory). A tensor of its
    own, not a permuted view: autograd forbids in-place ops on views made inside a custom Function."""
    order = sorted(range(3), key=lambda d: -q.stride(d))  # outermost first
    stride, size = [0, 0, 0, 1], Ev
    for d in reversed(order):
        stride[d], size = size, size * q.shape[d]
    return q.new_empty_strided((*q.shape[:3], Ev), stride)


def _lse(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


def _dmask(q: Tensor, S: int, needed: bool) -> Tensor:
    return q.new_zeros((*q.shape[:3], S) if needed else (0,), dtype=acc_dtype(q.dtype))


def _unit_last(t: Tensor) -> Tensor:
    """t with a unit-stride last dim: a copy only when it is strided."""
    if t.stride(-1) == 1:
        return t
    return t.as_strided(t.shape, (*t.stride()[:-1], 1)) if t.shape[-1] == 1 else t.contiguous()


def _run(op: str, q: Tensor, v: Tensor, outs, args) -> None:
    """The chosen backend, except for head dims of 0: the eager reference serves those everywhere."""
    if q.shape[-1] and v.shape[-1]:
        backend.dispatch(op, q.device.type, outs, *args)
    else:
        {"attention_fwd": _fwd_torch, "attention_bwd": _bwd_torch}[op](outs, *args)


@torch.library.custom_op("fusedstab::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                  dropout_p: float, seed: int, offset: int) -> tuple[Tensor, Tensor]:
    outs = _o_like(q, v.shape[-1]), _lse(q)
    args = (_unit_last(q), _unit_last(k), _unit_last(v), mask, causal, scale, dropout_p, seed, offset)
    if outs[1].numel() and not k.shape[2]:  # no keys: every row fully masked
        outs[0].zero_(), outs[1].fill_(float("-inf"))
    elif outs[1].numel():
        _run("attention_fwd", q, v, outs, args)
    return outs


@attention_fwd.register_fake
def _(q, k, v, mask, causal, scale, dropout_p, seed, offset):
    return _o_like(q, v.shape[-1]), _lse(q)


@torch.library.custom_op("fusedstab::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: Optional[Tensor],
                  causal: bool, scale: float, dropout_p: float, seed: int, offset: int,
                  mask_needs_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    outs = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _dmask(q, k.shape[2], mask_needs_grad)
    args = (_unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(o), lse.contiguous(), mask,
            causal, scale, dropout_p, seed, offset)
    if not lse.numel() or not k.shape[2]:
        for t in outs[:3]:
            t.zero_()
    else:
        _run("attention_bwd", q, v, outs, args)
    return outs


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, mask, causal, scale, dropout_p, seed, offset, mask_needs_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _dmask(q, k.shape[2], mask_needs_grad)


# ----------------------------------------------------------------------------- torch backend
def _keep(q: Tensor, S: int, dropout_p: float, seed: int, offset: int) -> Optional[Tensor]:
    """The torch backend's dropout keep mask (B, Hq, L, S): its own stream (not the Triton kernels'),
    regenerated from (seed, offset) for backward."""
    if dropout_p == 0.0:
        return None
    g = torch.Generator(device=q.device).manual_seed((seed * 1_000_003 + offset) % (1 << 63))
    return torch.rand((*q.shape[:3], S), generator=g, device=q.device) >= dropout_p


def _upcast(mask: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    return mask if mask is None or mask.dtype == torch.bool else mask.to(acc)


def _fwd_torch(outs, q, k, v, mask, causal, scale, dropout_p, seed, offset):
    acc = acc_dtype(q.dtype)
    qa, ka, va, ma = q.to(acc), k.to(acc), v.to(acc), _upcast(mask, acc)
    outs[0].copy_(reference.scaled_dot_product_attention(qa, ka, va, ma, dropout_p, causal, scale,
                                                         _keep(q, k.shape[2], dropout_p, seed, offset)))
    outs[1].copy_(torch.logsumexp(reference.attention_scores(qa, ka, ma, causal, scale), -1))


def _bwd_torch(outs, do, q, k, v, o, lse, mask, causal, scale, dropout_p, seed, offset):
    acc = acc_dtype(q.dtype)
    grads = reference.attention_bwd(do.to(acc), q.to(acc), k.to(acc), v.to(acc), _upcast(mask, acc), dropout_p,
                                    causal, scale, _keep(q, k.shape[2], dropout_p, seed, offset))
    for out, g in zip(outs, grads):
        if out.numel():
            out.copy_(g)


backend.register("attention_fwd", "torch", _fwd_torch)
backend.register("attention_bwd", "torch", _bwd_torch)


# ----------------------------------------------------------------------------- cpu backend (csrc/cpu/attention.cpp)
backend.register("attention_fwd", "cpu", backend.cpp("attention_fwd"))
backend.register("attention_bwd", "cpu", backend.cpp("attention_bwd"))


# ----------------------------------------------------------------------------- triton backend
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ok(*args) -> str | None:
    q, v = (args[0], args[2]) if len(args) == 9 else (args[1], args[3])
    why = unsupported((q,), _TRITON_DTYPES, "the triton attention kernels (fp16, bf16, fp32)")
    if why is None and max(q.shape[-1], v.shape[-1]) > 256:
        why = f"head dims up to 256 are served by the triton attention kernels, got {q.shape[-1]}, {v.shape[-1]}"
    return why


def _precise(q: Tensor) -> bool:
    """fp16/bf16 numerics: on CUDA FlashAttention's (P and dS rounded to the input dtype for the tensor
    cores, as torch's flash backend; dq, dk up to ~4x the error of an fp32 math path), elsewhere (the
    interpreter) the kernels' precise mode (P and dS as two halves: within ~1x of the math path, for
    1.5x / 1.7x the tensor-core work). FUSEDSTAB_ATTENTION_PRECISE=1 or 0 chooses either everywhere."""
    env = os.environ.get("FUSEDSTAB_ATTENTION_PRECISE", "")
    return env == "1" if env in ("0", "1") else q.device.type != "cuda"


def _allow_tf32(q: Tensor) -> bool:
    if q.device.type != "cuda" or q.dtype != torch.float32:  # the flag concerns fp32 matmuls only
        return False
    from ..kernels.common import fp32_matmul_allows_tf32  # the new API where it exists (torch >= 2.9)

    return fp32_matmul_allows_tf32()


def _fwd_triton(outs, q, k, v, mask, causal, scale, dropout_p, seed, offset):
    from ..kernels import attention as K

    K.attention_fwd(q, k, v, mask, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed, offset=offset,
                    allow_tf32=_allow_tf32(q), precise=_precise(q), out=outs)


def _bwd_triton(outs, do, q, k, v, o, lse, mask, causal, scale, dropout_p, seed, offset):
    from ..kernels import attention as K

    dmask = outs[3] if outs[3].numel() else None
    K.attention_bwd(do, q, k, v, o, lse, mask, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed,
                    offset=offset, mask_needs_grad=dmask is not None, allow_tf32=_allow_tf32(q),
                    precise=_precise(q), out=(*outs[:3], dmask))


backend.register("attention_fwd", "triton", _fwd_triton, _triton_ok)
backend.register("attention_bwd", "triton", _bwd_triton, _triton_ok)

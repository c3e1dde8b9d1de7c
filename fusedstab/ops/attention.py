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
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..reference import acc_dtype


def _o_like(q: Tensor, Ev: int) -> Tensor:
    """Empty (B, Hq, L, Ev) in q's dtype, its (B, Hq, L) dims in q's memory order, head dim innermost
    (q taken as a (B, L, H, E).transpose(1, 2) view gives o in (B, L, H, Ev) memory)."""
    order = sorted(range(3), key=lambda d: -q.stride(d))
    shape = (*q.shape[:3], Ev)
    t = q.new_empty([shape[d] for d in order] + [Ev])
    return t.permute(*[order.index(d) for d in range(3)], 3)


def _lse(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


def _dmask(q: Tensor, S: int, needed: bool) -> Tensor:
    return q.new_zeros((*q.shape[:3], S) if needed else (0,), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("fusedstab::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                  dropout_p: float, seed: int, offset: int) -> tuple[Tensor, Tensor]:
    return backend.dispatch("attention_fwd", q.device.type, q, k, v, mask, causal, scale, dropout_p, seed, offset)


@attention_fwd.register_fake
def _(q, k, v, mask, causal, scale, dropout_p, seed, offset):
    return _o_like(q, v.shape[-1]), _lse(q)


@torch.library.custom_op("fusedstab::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: Optional[Tensor],
                  causal: bool, scale: float, dropout_p: float, seed: int, offset: int,
                  mask_needs_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend.dispatch("attention_bwd", q.device.type, do, q, k, v, o, lse, mask, causal, scale, dropout_p,
                            seed, offset, mask_needs_grad)


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


def _fwd_torch(q, k, v, mask, causal, scale, dropout_p, seed, offset):
    acc = acc_dtype(q.dtype)
    qa, ka, va, ma = q.to(acc), k.to(acc), v.to(acc), _upcast(mask, acc)
    o = reference.scaled_dot_product_attention(qa, ka, va, ma, dropout_p, causal, scale,
                                               _keep(q, k.shape[2], dropout_p, seed, offset))
    lse = torch.logsumexp(reference.attention_scores(qa, ka, ma, causal, scale), -1)
    return _o_like(q, v.shape[-1]).copy_(o), lse


def _bwd_torch(do, q, k, v, o, lse, mask, causal, scale, dropout_p, seed, offset, mask_needs_grad):
    acc = acc_dtype(q.dtype)
    dq, dk, dv, ds = reference.attention_bwd(do.to(acc), q.to(acc), k.to(acc), v.to(acc), _upcast(mask, acc),
                                             dropout_p, causal, scale, _keep(q, k.shape[2], dropout_p, seed, offset))
    grads = tuple(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), (dq, dk, dv)))
    return (*grads, ds if mask_needs_grad else _dmask(q, k.shape[2], False))


backend.register("attention_fwd", "torch", _fwd_torch)
backend.register("attention_bwd", "torch", _bwd_torch)


# ----------------------------------------------------------------------------- triton backend
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ok(*args) -> str | None:
    q, k, v = args[:3] if len(args) == 9 else args[1:4]
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not served by the triton attention kernels (fp16, bf16, fp32)"
    if max(q.shape[-1], v.shape[-1]) > 256:
        return f"head dims up to 256 are served by the triton attention kernels, got {q.shape[-1]}, {v.shape[-1]}"
    return None


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


def _fwd_triton(q, k, v, mask, causal, scale, dropout_p, seed, offset):
    from ..kernels import attention as K

    o, lse = K.attention_fwd(q, k, v, mask, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed,
                             offset=offset, allow_tf32=_allow_tf32(q), precise=_precise(q))
    want = _o_like(q, v.shape[-1])
    return (o if o.stride() == want.stride() else want.copy_(o)), lse


def _bwd_triton(do, q, k, v, o, lse, mask, causal, scale, dropout_p, seed, offset, mask_needs_grad):
    from ..kernels import attention as K

    dq, dk, dv, dmask = K.attention_bwd(do, q, k, v, o, lse, mask, causal=causal, scale=scale, dropout_p=dropout_p,
                                        seed=seed, offset=offset, mask_needs_grad=mask_needs_grad,
                                        allow_tf32=_allow_tf32(q), precise=_precise(q))
    return dq, dk, dv, (dmask if mask_needs_grad else _dmask(q, k.shape[2], False))


backend.register("attention_fwd", "triton", _fwd_triton, _triton_ok)
backend.register("attention_bwd", "triton", _bwd_triton, _triton_ok)

"""LayerNorm / RMSNorm (optionally with the residual add fused) as torch.library custom ops.

``fusedstab::layer_norm_fwd(x, weight, bias, residual, eps, rms, normalized_ndim=1) -> (y, h, mean, rstd)``
``fusedstab::layer_norm_bwd(dy, h, weight, bias, mean, rstd, dh, rms) -> (dx, dweight, dbias)``

The forward takes the caller's x (and residual), of any shape and strides, and normalizes rows of its
last ``normalized_ndim`` dims (N elements; M rows): y and h come back contiguous in x's shape, so that
autograd hands the user tensors of their own (never a view made inside a custom Function, which
autograd forbids modifying in place). The backward sees rows: dy, h and dh are (M, N) with any
strides (fusedstab.autograd views them so), dx is (M, N). weight and bias are (N,). Optional outputs
that do not apply are empty tensors, since a custom op cannot return None or an alias of an input: h
without a residual, mean for RMSNorm, dweight/dbias without weight or bias. Input validation with
torch's messages happens in ``fusedstab.functional``; these ops assume valid, same-device,
floating-point tensors.

What every backend may assume (and the C++ kernels check): numel > 0; the (M, N) rows of x, residual,
dy, h, dh with unit column stride (any row stride); weight and bias contiguous (N,), of any float
dtype; the (M, N) views of y, h and dx contiguous; mean / rstd (M,) in the accumulation dtype of h's
dtype (mean empty for RMSNorm); dweight / dbias in the parameter's dtype, empty without it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..numerics import acc_dtype, params_unsupported, unsupported, wide_dtypes

_EMPTY = (0,)


def _h_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _m_n(x: Tensor, normalized_ndim: int) -> tuple[int, int]:
    lead = x.dim() - normalized_ndim
    return math.prod(x.shape[:lead]), math.prod(x.shape[lead:])


def _fwd_outputs(x, residual, rms, normalized_ndim):
    M, _ = _m_n(x, normalized_ndim)
    hd = _h_dtype(x, residual)
    acc = acc_dtype(hd)
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape if residual is not None else _EMPTY, dtype=hd)
    mean = x.new_empty(_EMPTY if rms else (M,), dtype=acc)
    rstd = x.new_empty((M,), dtype=acc)
    return y, h, mean, rstd


def _bwd_outputs(h, weight, bias):
    dx = torch.empty_like(h, memory_format=torch.contiguous_format)
    dw = h.new_empty(_EMPTY) if weight is None else torch.empty_like(weight)
    db = h.new_empty(_EMPTY) if bias is None else torch.empty_like(bias)
    return dx, dw, db


def _unit_cols(t: Optional[Tensor]) -> Optional[Tensor]:
    """Rows with unit column stride: a copy only when a row is strided."""
    if t is None or t.stride(1) == 1:
        return t
    return t.as_strided(t.shape, (t.stride(0), 1)) if t.shape[1] == 1 else t.contiguous()


def _rows(t: Optional[Tensor], M: int, N: int) -> Optional[Tensor]:
    """(M, N) rows of t with unit column stride (a copy only where no such view exists)."""
    return None if t is None else _unit_cols(t.reshape(M, N))


def _dense(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.contiguous()  # weight/bias: N elements, a copy is cheap


@torch.library.custom_op("fusedstab::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], eps: float, rms: bool, normalized_ndim: int = 1
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    outs = _fwd_outputs(x, residual, rms, normalized_ndim)
    if not x.numel():  # rows of length 0 have no statistics (torch reports mean 0, rstd NaN)
        outs[2].zero_(), outs[3].fill_(float("nan"))
        return outs
    y, h, mean, rstd = outs
    M, N = _m_n(x, normalized_ndim)
    backend.dispatch("layer_norm_fwd", x.device.type, (y.view(M, N), h if residual is None else h.view(M, N),
                                                        mean, rstd),
                     _rows(x, M, N), _dense(weight), _dense(bias), _rows(residual, M, N), eps, rms)
    return outs


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, rms, normalized_ndim=1):
    return _fwd_outputs(x, residual, rms, normalized_ndim)


@torch.library.custom_op("fusedstab::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, dh: Optional[Tensor], rms: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    outs = _bwd_outputs(h, weight, bias)
    if not h.numel():
        for t in outs:
            t.zero_()
        return outs
    backend.dispatch("layer_norm_bwd", h.device.type, outs, _unit_cols(dy), _unit_cols(h), _dense(weight),
                     _dense(bias), mean.contiguous(), rstd.contiguous(), _unit_cols(dh), rms)
    return outs


@layer_norm_bwd.register_fake
def _(dy, h, weight, bias, mean, rstd, dh, rms):
    return _bwd_outputs(h, weight, bias)


# ----------------------------------------------------------------------------- torch backend
def _fwd_torch(outs, x, weight, bias, residual, eps, rms):
    y, h, mean, rstd = outs
    ry, rh, rmean, rrstd = reference.norm_fwd(x, weight, bias, residual, eps, rms)
    y.copy_(ry), rstd.copy_(rrstd)
    if rh is not None:
        h.copy_(rh)
    if rmean is not None:
        mean.copy_(rmean)


def _bwd_torch(outs, dy, h, weight, bias, mean, rstd, dh, rms):
    dx, dw, db = outs
    gx, gw, gb = reference.norm_bwd(dy, h, weight, None if rms else mean, rstd, dh, rms, bias is not None)
    dx.copy_(gx)
    if gw is not None:
        dw.copy_(gw)
    if gb is not None:
        db.copy_(gb)


backend.register("layer_norm_fwd", "torch", _fwd_torch)
backend.register("layer_norm_bwd", "torch", _bwd_torch)


# ----------------------------------------------------------------------------- cpu backend (C++)
# csrc/cpu/layer_norm.cpp
def _cpp_ok(*args) -> str | None:
    return unsupported(args, what="the C++ CPU kernels")


backend.register("layer_norm_fwd", "cpu", backend.cpp("layer_norm_fwd"), _cpp_ok)
backend.register("layer_norm_bwd", "cpu", backend.cpp("layer_norm_bwd"), _cpp_ok)


# ----------------------------------------------------------------------------- triton backend
def _triton_ok(*args) -> str | None:
    return unsupported(args, what="the triton kernels")


def _fwd_triton(outs, x, weight, bias, residual, eps, rms):
    from ..kernels import layer_norm as K

    y, h, mean, rstd = outs
    K.fwd(x, residual, weight, bias, y, h if residual is not None else None, mean, rstd, eps, rms)


def _bwd_triton(outs, dy, h, weight, bias, mean, rstd, dh, rms):
    from ..kernels import layer_norm as K

    dx, dw, db = outs
    K.bwd(dy, h, weight, mean, rstd, dh, dx, dw if weight is not None else None, db if bias is not None else None,
          rms)


backend.register("layer_norm_fwd", "triton", _fwd_triton, _triton_ok)
backend.register("layer_norm_bwd", "triton", _bwd_triton, _triton_ok)


# ----------------------------------------------------------------------------- cuda backend
def _cuda_dtypes_ok(x_dtype, h_dtype, params) -> str | None:
    """h (x + residual) and the parameters of x's dtype or fp32 for fp16/bf16 x (csrc/cuda/layer_norm.h)."""
    if h_dtype not in wide_dtypes(x_dtype):
        return f"the cuda kernels take no {x_dtype} input with a {h_dtype} residual sum"
    return params_unsupported(x_dtype, params, what="the cuda kernels")


def _cuda_fwd_ok(x, weight, bias, residual, eps, rms) -> str | None:
    return unsupported((x, weight, bias, residual), what="the cuda kernels") or _cuda_dtypes_ok(
        x.dtype, _h_dtype(x, residual), (weight, bias))


def _cuda_bwd_ok(dy, h, weight, bias, mean, rstd, dh, rms) -> str | None:
    return unsupported((dy, h, weight, bias, dh), what="the cuda kernels") or _cuda_dtypes_ok(
        dy.dtype, h.dtype, (weight, bias))


backend.register("layer_norm_fwd", "cuda", backend.cpp("layer_norm_fwd"), _cuda_fwd_ok)
backend.register("layer_norm_bwd", "cuda", backend.cpp("layer_norm_bwd"), _cuda_bwd_ok)

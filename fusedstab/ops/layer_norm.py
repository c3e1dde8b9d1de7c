"""LayerNorm / RMSNorm (optionally with the residual add fused) as torch.library custom ops.

``fusedstab::layer_norm_fwd(x, weight, bias, residual, eps, rms) -> (y, h, mean, rstd)``
``fusedstab::layer_norm_bwd(dy, h, weight, bias, mean, rstd, dh, rms) -> (dx, dweight, dbias)``

Ops see rows: x is (M, N) with any strides (the rows view of the caller's tensor). Outputs are
contiguous. Optional outputs that do not apply are empty tensors, since a custom op cannot return
None or an alias of an input: h without a residual, mean for RMSNorm, dweight/dbias without weight or
bias. Input validation with torch's messages happens in ``fusedstab.functional``; these ops assume
valid, same-device, floating-point tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..reference import acc_dtype

_EMPTY = (0,)


def _h_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _fwd_outputs(x, residual, rms):
    M, N = x.shape
    hd = _h_dtype(x, residual)
    acc = acc_dtype(hd)
    y = x.new_empty((M, N))
    h = x.new_empty((M, N) if residual is not None else _EMPTY, dtype=hd)
    mean = x.new_empty(_EMPTY if rms else (M,), dtype=acc)
    rstd = x.new_empty((M,), dtype=acc)
    return y, h, mean, rstd


def _bwd_outputs(h, weight, bias):
    dx = torch.empty_like(h, memory_format=torch.contiguous_format)
    dw = h.new_empty(_EMPTY) if weight is None else torch.empty_like(weight)
    db = h.new_empty(_EMPTY) if bias is None else torch.empty_like(bias)
    return dx, dw, db


@torch.library.custom_op("fusedstab::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], eps: float, rms: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend.dispatch("layer_norm_fwd", x.device.type, x, weight, bias, residual, eps, rms)


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, rms):
    return _fwd_outputs(x, residual, rms)


@torch.library.custom_op("fusedstab::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, dh: Optional[Tensor], rms: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    return backend.dispatch("layer_norm_bwd", h.device.type, dy, h, weight, bias, mean, rstd, dh, rms)


@layer_norm_bwd.register_fake
def _(dy, h, weight, bias, mean, rstd, dh, rms):
    return _bwd_outputs(h, weight, bias)


# ----------------------------------------------------------------------------- torch backend
def _fwd_torch(x, weight, bias, residual, eps, rms):
    if not x.numel():
        y, h, mean, rstd = _fwd_outputs(x, residual, rms)
        _fill_empty_stats(mean, rstd)
        return y, h, mean, rstd
    y, h, mean, rstd = reference.norm_fwd(x, weight, bias, residual, eps, rms)
    # The reference's outputs are fresh tensors (never views of the inputs), as custom ops require.
    return (y.contiguous(), x.new_empty(_EMPTY, dtype=_h_dtype(x, residual)) if h is None else h.contiguous(),
            x.new_empty(_EMPTY, dtype=rstd.dtype) if mean is None else mean, rstd)


def _bwd_torch(dy, h, weight, bias, mean, rstd, dh, rms):
    if not h.numel():
        dx, dw, db = _bwd_outputs(h, weight, bias)
        return dx.zero_(), dw.zero_(), db.zero_()
    dx, dw, db = reference.norm_bwd(dy, h, weight, None if rms else mean, rstd, dh, rms, bias is not None)
    return (dx.contiguous(), h.new_empty(_EMPTY) if dw is None else dw.to(weight.dtype),
            h.new_empty(_EMPTY) if db is None else db.to(bias.dtype))


def _fill_empty_stats(mean, rstd):
    # Rows of length 0 have no statistics (torch reports mean 0, rstd NaN); y is empty anyway.
    mean.zero_()
    rstd.fill_(float("nan"))


backend.register("layer_norm_fwd", "torch", _fwd_torch)
backend.register("layer_norm_bwd", "torch", _bwd_torch)


# ----------------------------------------------------------------------------- triton backend
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _triton_ok(*tensors) -> str | None:
    for t in tensors:
        if isinstance(t, Tensor) and t.dtype not in _TRITON_DTYPES and t.numel():
            return f"dtype {t.dtype} is not supported by the triton kernels"
    return None


def _unit_cols(t: Optional[Tensor]) -> Optional[Tensor]:
    """Kernels take any row stride but need contiguous rows: copy only when a row is strided."""
    if t is not None and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def _dense(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.contiguous()  # weight/bias: N elements, a copy is cheap


def _fwd_triton(x, weight, bias, residual, eps, rms):
    from ..kernels import layer_norm as K

    weight, bias = _dense(weight), _dense(bias)
    y, h, mean, rstd = _fwd_outputs(x, residual, rms)
    if x.numel():
        K.fwd(_unit_cols(x), _unit_cols(residual), weight, bias, y, h if residual is not None else None,
              mean, rstd, eps, rms)
    else:
        _fill_empty_stats(mean, rstd)
    return y, h, mean, rstd


def _bwd_triton(dy, h, weight, bias, mean, rstd, dh, rms):
    from ..kernels import layer_norm as K

    weight, bias = _dense(weight), _dense(bias)
    dx, dw, db = _bwd_outputs(h, weight, bias)
    if not h.numel():
        dx.zero_(), dw.zero_(), db.zero_()
        return dx, dw, db
    K.bwd(_unit_cols(dy), _unit_cols(h), weight, mean, rstd, _unit_cols(dh), dx,
          dw if weight is not None else None, db if bias is not None else None, rms)
    return dx, dw, db


backend.register("layer_norm_fwd", "triton", _fwd_triton, _triton_ok)
backend.register("layer_norm_bwd", "triton", _bwd_triton, _triton_ok)

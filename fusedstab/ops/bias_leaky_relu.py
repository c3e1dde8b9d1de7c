"""Bias + Leaky ReLU, and Linear + bias + Leaky ReLU, as torch.library custom ops.

``fusedstab::bias_leaky_relu_fwd(x, bias, slope, per_row) -> (y, mask)``
``fusedstab::bias_leaky_relu_bwd(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias) -> (dx, dbias)``
``fusedstab::linear_leaky_relu_fwd(x, weight, bias, slope) -> (y, mask)``

The elementwise ops see a 2-D (R, L) view in memory order (fusedstab.autograd builds it): the bias is
per column (``per_row=False``, L == C) or per row (``per_row=True``, index row % C). y has the
promoted dtype of x and bias, contiguous (R, L). ``mask`` is the packed sign mask (R, ceil(L/8))
uint8 when slope < 0 (backward cannot tell the sign of x + b from y then), else empty; backward's
``saved`` is that mask, or y. dbias comes back in the accumulation dtype, shape (C,), empty unless
asked for; dx is empty unless asked for. The linear op's x is (M, K), weight (N, K): its y and mask
are those of the elementwise op on x @ weight.T with per-column bias, so its backward is
``bias_leaky_relu_bwd`` followed by two matmuls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import acc_dtype

_EMPTY = (0,)


def saves_mask(slope: float) -> bool:
    """For slope >= 0 (and NaN) y > 0 exactly where x + b > 0; otherwise backward needs the mask."""
    return slope < 0


def _fwd_outputs(x: Tensor, bias: Optional[Tensor], slope: float, L: Optional[int] = None):
    R = x.shape[0]
    L = x.shape[1] if L is None else L
    dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    y = x.new_empty((R, L), dtype=dtype)
    mask = x.new_empty((R, (L + 7) // 8) if saves_mask(slope) else _EMPTY, dtype=torch.uint8)
    return y, mask


@torch.library.custom_op("fusedstab::bias_leaky_relu_fwd", mutates_args=())
def bias_leaky_relu_fwd(x: Tensor, bias: Optional[Tensor], slope: float, per_row: bool
                        ) -> tuple[Tensor, Tensor]:
    return backend.dispatch("bias_leaky_relu_fwd", x.device.type, x, bias, slope, per_row)


@bias_leaky_relu_fwd.register_fake
def _(x, bias, slope, per_row):
    return _fwd_outputs(x, bias, slope)


@torch.library.custom_op("fusedstab::bias_leaky_relu_bwd", mutates_args=())
def bias_leaky_relu_bwd(dy: Tensor, saved: Tensor, slope: float, per_row: bool, C: int,
                        dx_dtype: torch.dtype, need_dx: bool, need_dbias: bool) -> tuple[Tensor, Tensor]:
    return backend.dispatch("bias_leaky_relu_bwd", dy.device.type, dy, saved, slope, per_row, C, dx_dtype,
                            need_dx, need_dbias)


def _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias):
    dx = dy.new_empty(dy.shape if need_dx else _EMPTY, dtype=dx_dtype)
    db = dy.new_empty((C,) if need_dbias else _EMPTY, dtype=acc_dtype(dy.dtype))
    return dx, db


@bias_leaky_relu_bwd.register_fake
def _(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias):
    return _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias)


@torch.library.custom_op("fusedstab::linear_leaky_relu_fwd", mutates_args=())
def linear_leaky_relu_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], slope: float
                          ) -> tuple[Tensor, Tensor]:
    return backend.dispatch("linear_leaky_relu_fwd", x.device.type, x, weight, bias, slope)


@linear_leaky_relu_fwd.register_fake
def _(x, weight, bias, slope):
    return _fwd_outputs(x, None, slope, weight.shape[0])


# ----------------------------------------------------------------------------- torch backend
def _bias_2d(bias: Tensor, R: int, per_row: bool) -> Tensor:
    return bias.repeat(R // bias.shape[0])[:, None] if per_row else bias[None, :]


def pack_mask(pos: Tensor) -> Tensor:
    """(R, L) bool -> (R, ceil(L/8)) uint8, column 8k + j in bit j of byte k."""
    R, L = pos.shape
    padded = torch.nn.functional.pad(pos.to(torch.uint8), (0, (-L) % 8)).view(R, (L + 7) // 8, 8)
    shifts = torch.arange(8, device=pos.device, dtype=torch.uint8)
    return (padded << shifts).sum(-1, dtype=torch.uint8)


def unpack_mask(mask: Tensor, L: int) -> Tensor:
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask[..., None] >> shifts) & 1).bool().reshape(mask.shape[0], -1)[:, :L]


def _activate(z: Tensor, slope: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    y = torch.where(z > 0, z, z * slope).to(out_dtype).contiguous()  # as the op promises
    mask = pack_mask(z > 0) if saves_mask(slope) else z.new_empty(_EMPTY, dtype=torch.uint8)
    return y, mask


def _fwd_torch(x, bias, slope, per_row):
    y, _ = _fwd_outputs(x, bias, slope)
    z = x.to(acc_dtype(y.dtype))
    if bias is not None and x.numel():
        z = z + _bias_2d(bias.to(z.dtype), x.shape[0], per_row)
    return _activate(z, slope, y.dtype)


def _bwd_torch(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias):
    dx, db = _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias)
    if not dy.numel():
        return dx.zero_(), db.zero_()
    pos = unpack_mask(saved, dy.shape[1]) if saves_mask(slope) else saved > 0
    g = dy.to(db.dtype)
    dz = torch.where(pos, g, g * slope)
    if need_dx:
        dx = dz.to(dx_dtype).contiguous()
    if need_dbias:
        db = dz.sum(1).view(-1, C).sum(0) if per_row else dz.sum(0)
    return dx, db


def _linear_torch(x, weight, bias, slope):
    z = torch.nn.functional.linear(x, weight, bias)
    return _activate(z.to(acc_dtype(z.dtype)), slope, z.dtype)


backend.register("bias_leaky_relu_fwd", "torch", _fwd_torch)
backend.register("bias_leaky_relu_bwd", "torch", _bwd_torch)
backend.register("linear_leaky_relu_fwd", "torch", _linear_torch)


# ----------------------------------------------------------------------------- triton backend
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _elementwise_ok(*args) -> str | None:
    for t in args:
        if isinstance(t, Tensor) and t.dtype not in _FLOATS + (torch.uint8,):
            return f"dtype {t.dtype} is not supported by the triton kernels"
    return None


def _matmul_ok(x, weight, bias, slope) -> str | None:
    if x.dtype not in _FLOATS:
        return f"dtype {x.dtype} is not supported by the triton kernels"
    if x.dtype == torch.float64 and x.device.type == "cuda":
        return "fp64 matmuls are left to cuBLAS (the torch backend)"
    return None


def _fwd_triton(x, bias, slope, per_row):
    from ..kernels import bias_leaky_relu as K

    y, mask = _fwd_outputs(x, bias, slope)
    if x.numel():
        K.fwd(x, None if bias is None else bias.contiguous(), y, mask if saves_mask(slope) else None,
              slope, per_row)
    return y, mask


def _bwd_triton(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias):
    from ..kernels import bias_leaky_relu as K

    dx, db = _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias)
    if not dy.numel():
        return dx, db.zero_()
    part = K.bwd(dy, saved, dx if need_dx else None, slope, saves_mask(slope), per_row, need_dbias)
    if need_dbias:  # the second, small reduction of the per-program partial sums
        db.copy_(part.sum(0).view(-1, C).sum(0) if per_row else part.sum(0))
    return dx, db


def _linear_triton(x, weight, bias, slope):
    from ..kernels import linear_leaky_relu as K

    y, mask = _fwd_outputs(x, None, slope, weight.shape[0])
    if y.numel():
        K.linear_leaky_relu(x, weight, None if bias is None else bias.contiguous(), y,
                            mask if saves_mask(slope) else None, slope)
    return y, mask


backend.register("bias_leaky_relu_fwd", "triton", _fwd_triton, _elementwise_ok)
backend.register("bias_leaky_relu_bwd", "triton", _bwd_triton, _elementwise_ok)
backend.register("linear_leaky_relu_fwd", "triton", _linear_triton, _matmul_ok)

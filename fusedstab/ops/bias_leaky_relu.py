"""Bias + Leaky ReLU as torch.library custom ops.

``fusedstab::bias_leaky_relu_fwd(x, bias, slope, per_row) -> (y, mask)``
``fusedstab::bias_leaky_relu_bwd(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias) -> (dx, dbias)``

The ops see a 2-D (R, L) view in memory order (fusedstab.autograd builds it): the bias is per column
(``per_row=False``, L == C) or per row (``per_row=True``, index row % C). y has the promoted dtype of
x and bias, contiguous (R, L). ``mask`` is the packed sign mask (R, ceil(L/8)) uint8 when slope < 0
(backward cannot tell the sign of x + b from y then), else empty; backward's ``saved`` is that mask,
or y. dbias comes back in the accumulation dtype, shape (C,), empty unless asked for; dx is empty
unless asked for.

What every backend may assume (and the C++ kernels check): numel > 0; x, dy, saved and the bias
contiguous; outputs as above.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..numerics import FLOATS, acc_dtype, unsupported

_EMPTY = (0,)


def saves_mask(slope: float) -> bool:
    """For slope >= 0 (and NaN) y > 0 exactly where x + b > 0; otherwise backward needs the mask."""
    return slope < 0


def fwd_outputs(x: Tensor, bias: Optional[Tensor], slope: float, L: Optional[int] = None):
    """(y, mask) of an (R, L) output: shared with linear_leaky_relu, whose L is out_features."""
    R = x.shape[0]
    L = x.shape[1] if L is None else L
    dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    y = x.new_empty((R, L), dtype=dtype)
    mask = x.new_empty((R, (L + 7) // 8) if saves_mask(slope) else _EMPTY, dtype=torch.uint8)
    return y, mask


def _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias):
    dx = dy.new_empty(dy.shape if need_dx else _EMPTY, dtype=dx_dtype)
    db = dy.new_empty((C,) if need_dbias else _EMPTY, dtype=acc_dtype(dy.dtype))
    return dx, db


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op("fusedstab::bias_leaky_relu_fwd", mutates_args=())
def bias_leaky_relu_fwd(x: Tensor, bias: Optional[Tensor], slope: float, per_row: bool
                        ) -> tuple[Tensor, Tensor]:
    outs = fwd_outputs(x, bias, slope)
    if x.numel():
        backend.dispatch("bias_leaky_relu_fwd", x.device.type, outs, x.contiguous(), _dense(bias), slope, per_row)
    return outs


@bias_leaky_relu_fwd.register_fake
def _(x, bias, slope, per_row):
    return fwd_outputs(x, bias, slope)


@torch.library.custom_op("fusedstab::bias_leaky_relu_bwd", mutates_args=())
def bias_leaky_relu_bwd(dy: Tensor, saved: Tensor, slope: float, per_row: bool, C: int,
                        dx_dtype: torch.dtype, need_dx: bool, need_dbias: bool) -> tuple[Tensor, Tensor]:
    outs = _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias)
    if not dy.numel():
        outs[1].zero_()
    elif need_dx or need_dbias:
        backend.dispatch("bias_leaky_relu_bwd", dy.device.type, outs, dy.contiguous(), saved.contiguous(), slope,
                         per_row, C)
    return outs


@bias_leaky_relu_bwd.register_fake
def _(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias):
    return _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias)


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


def activate_into(outs, z: Tensor, slope: float) -> None:
    """y = leaky_relu(z) (z in the accumulation dtype) rounded once into outs[0], and the sign mask."""
    y, mask = outs
    y.copy_(torch.where(z > 0, z, z * slope))
    if saves_mask(slope):
        mask.copy_(pack_mask(z > 0))


def _fwd_torch(outs, x, bias, slope, per_row):
    z = x.to(acc_dtype(outs[0].dtype))
    if bias is not None:
        z = z + _bias_2d(bias.to(z.dtype), x.shape[0], per_row)
    activate_into(outs, z, slope)


def _bwd_torch(outs, dy, saved, slope, per_row, C):
    dx, db = outs
    pos = unpack_mask(saved, dy.shape[1]) if saves_mask(slope) else saved > 0
    g = dy.to(acc_dtype(dy.dtype))
    dz = torch.where(pos, g, g * slope)
    if dx.numel():
        dx.copy_(dz)
    if db.numel():
        db.copy_(dz.sum(1).view(-1, C).sum(0) if per_row else dz.sum(0))


backend.register("bias_leaky_relu_fwd", "torch", _fwd_torch)
backend.register("bias_leaky_relu_bwd", "torch", _bwd_torch)


# ----------------------------------------------------------------------------- triton backend
def _triton_ok(*args) -> str | None:  # and the cuda kernels'
    return unsupported(args, FLOATS + (torch.uint8,), "the triton and cuda kernels")


def _fwd_triton(outs, x, bias, slope, per_row):
    from ..kernels import bias_leaky_relu as K

    y, mask = outs
    K.fwd(x, bias, y, mask if saves_mask(slope) else None, slope, per_row)


def _bwd_triton(outs, dy, saved, slope, per_row, C):
    from ..kernels import bias_leaky_relu as K

    dx, db = outs
    part = K.bwd(dy, saved, dx if dx.numel() else None, slope, saves_mask(slope), per_row, db.numel() > 0)
    if db.numel():  # the second, small reduction of the per-program partial sums
        db.copy_(part.sum(0).view(-1, C).sum(0) if per_row else part.sum(0))


backend.register("bias_leaky_relu_fwd", "triton", _fwd_triton, _triton_ok)
backend.register("bias_leaky_relu_bwd", "triton", _bwd_triton, _triton_ok)


# ----------------------------------------------------------------------------- cuda backend
backend.register("bias_leaky_relu_fwd", "cuda", backend.cpp("bias_leaky_relu_fwd"), _triton_ok)
backend.register("bias_leaky_relu_bwd", "cuda", backend.cpp("bias_leaky_relu_bwd"), _triton_ok)

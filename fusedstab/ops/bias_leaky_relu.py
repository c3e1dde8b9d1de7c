"""Bias + Leaky ReLU as torch.library custom ops.

``fusedstab::bias_leaky_relu_fwd(x, bias, slope, dim) -> (y, mask)``
``fusedstab::bias_leaky_relu_bwd(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias) -> (dx, dbias)``

The forward takes the caller's x, the bias (x.shape[dim],) or None broadcast along ``dim`` (>= 0).
y has x's shape, the promoted dtype of x and bias, and x's memory layout where the kernels read x in
place (contiguous, channels_last(_3d)), else it is contiguous: the op's own tensor, never a view made
inside a custom Function (which autograd forbids modifying in place). The kernels see x and y as the
2-D (R, L) view in memory order of ``memory_order_2d``: the bias per column (``per_row=False``,
L == C) or per row (``per_row=True``, index row % C). ``mask`` is the packed sign mask
(R, ceil(L/8)) uint8 when slope < 0 (backward cannot tell the sign of x + b from y then), else
empty. The backward sees that 2-D view: dy (R, L), ``saved`` the mask or y's (R, L) view; dbias
comes back in the accumulation dtype, shape (C,), empty unless asked for; dx (R, L) is empty unless
asked for.

What every backend may assume (and the C++ kernels check): numel > 0; x, dy, saved and the bias
contiguous (R, L) / (C,); outputs as above.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..numerics import FLOATS, acc_dtype, unsupported
from .layout import in_place_layout

_EMPTY = (0,)


def saves_mask(slope: float) -> bool:
    """For slope >= 0 (and NaN) y > 0 exactly where x + b > 0; otherwise backward needs the mask."""
    return slope < 0


def memory_order_2d(x: Tensor, dim: int):
    """x's dims in memory order, split at ``dim`` into (outer, C, inner): returns (order, permuted
    shape, (R, L), per_row). Rows of C (per-column bias) when inner == 1, e.g. a Linear output or
    channels_last NCHW with dim=1; else rows of inner, bias index row % C. For contiguous and
    channels_last(_3d) x, ``x.permute(order).reshape(R, L)`` is a view; any other layout is read
    through a contiguous copy. (No sort on strides: under dynamic shapes they are symbolic.)"""
    order = list(range(x.dim()))
    if not x.is_contiguous() and in_place_layout(x):  # channels_last(_3d)
        order = [0, *range(2, x.dim()), 1]
    shape = [x.shape[i] for i in order]
    p = order.index(dim)
    outer, C, inner = math.prod(shape[:p]), shape[p], math.prod(shape[p + 1:])
    per_row = inner != 1
    return order, shape, ((outer * C, inner) if per_row else (outer, C)), per_row


def to_2d(t: Tensor, order, rl) -> Tensor:
    """The (R, L) view of t (x's shape) in memory order (a copy where t's layout differs)."""
    return t.permute(order).reshape(rl)


def from_2d(t2: Tensor, order, shape) -> Tensor:
    """Inverse of ``to_2d``: x's shape, with x's memory layout when x was dense."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t2.view(shape).permute(inverse)


def _dtype(x: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    return x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)


def _mask(x: Tensor, R: int, L: int, slope: float) -> Tensor:
    return x.new_empty((R, (L + 7) // 8) if saves_mask(slope) else _EMPTY, dtype=torch.uint8)


def fwd_outputs(x: Tensor, bias: Optional[Tensor], slope: float, dim: int):
    """(y, mask): y like x (x's layout where it is read in place, else contiguous), mask over the 2-D
    view."""
    _, _, (R, L), _ = memory_order_2d(x, dim)
    y = torch.empty_like(x if in_place_layout(x) else x.contiguous(), dtype=_dtype(x, bias))
    return y, _mask(x, R, L, slope)


def linear_outputs(x: Tensor, N: int, slope: float):
    """(y, mask) of linear_leaky_relu: y (*, N) contiguous, mask over its (M, N) rows."""
    y = x.new_empty((*x.shape[:-1], N))
    return y, _mask(x, math.prod(x.shape[:-1]), N, slope)


def _bwd_outputs(dy, C, dx_dtype, need_dx, need_dbias):
    dx = dy.new_empty(dy.shape if need_dx else _EMPTY, dtype=dx_dtype)
    db = dy.new_empty((C,) if need_dbias else _EMPTY, dtype=acc_dtype(dy.dtype))
    return dx, db


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op("fusedstab::bias_leaky_relu_fwd", mutates_args=())
def bias_leaky_relu_fwd(x: Tensor, bias: Optional[Tensor], slope: float, dim: int) -> tuple[Tensor, Tensor]:
    y, mask = fwd_outputs(x, bias, slope, dim)
    if x.numel():
        order, _, rl, per_row = memory_order_2d(x, dim)
        backend.dispatch("bias_leaky_relu_fwd", x.device.type, (to_2d(y, order, rl), mask),
                         to_2d(x, order, rl).contiguous(), _dense(bias), slope, per_row)
    return y, mask


@bias_leaky_relu_fwd.register_fake
def _(x, bias, slope, dim):
    return fwd_outputs(x, bias, slope, dim)


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

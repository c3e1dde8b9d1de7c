"""bias + Leaky ReLU: an autograd.Function over ``fusedstab::bias_leaky_relu_fwd`` / ``_bwd``."""
from __future__ import annotations

import math

import torch

from ..ops.bias_leaky_relu import saves_mask
from .common import forward_backend, in_place_layout, remember_backend

_ops = torch.ops.fusedstab


def _memory_order_2d(x, dim):
    """x's dims in memory order, split at ``dim`` into (outer, C, inner): returns (order, permuted
    shape, (R, L), per_row). Rows of C (per-column bias) when inner == 1, e.g. a Linear output or
    channels_last NCHW with dim=1; else rows of inner, bias index row % C. Contiguous and
    channels_last(_3d) x are read in place (``x.permute(order).reshape(R, L)`` is a view); any other
    layout is read through a contiguous copy. (No sort on strides: under dynamic shapes they are
    symbolic.)"""
    order = list(range(x.dim()))
    if not x.is_contiguous() and in_place_layout(x):  # channels_last(_3d)
        order = [0, *range(2, x.dim()), 1]
    shape = [x.shape[i] for i in order]
    p = order.index(dim)
    outer, C, inner = math.prod(shape[:p]), shape[p], math.prod(shape[p + 1:])
    per_row = inner != 1
    return order, shape, ((outer * C, inner) if per_row else (outer, C)), per_row


def _from_2d(t2, order, shape):
    """Inverse of the 2-D view: x's shape, with x's memory layout when x was dense."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t2.view(shape).permute(inverse)


def saved_for_backward(y, mask, slope):
    """What backward reads: y, or for a negative slope the sign mask."""
    return mask if saves_mask(slope) else y


class BiasLeakyReLUFunction(torch.autograd.Function):
    """``BiasLeakyReLUFunction.apply(x, bias, negative_slope, dim) -> leaky_relu(x + bias)``, the bias
    (or None) broadcast along ``dim`` (a non-negative dim of x)."""

    @staticmethod
    def forward(ctx, x, bias, negative_slope, dim):
        order, shape, rl, per_row = _memory_order_2d(x, dim)
        y2, mask = _ops.bias_leaky_relu_fwd(x.permute(order).reshape(rl), bias, negative_slope, per_row)
        remember_backend(ctx)
        ctx.layout, ctx.slope, ctx.x_dtype = (order, shape, rl, per_row), negative_slope, x.dtype
        ctx.bias_dtype, ctx.C = (None, 1) if bias is None else (bias.dtype, bias.shape[0])
        ctx.save_for_backward(saved_for_backward(y2, mask, negative_slope))
        return _from_2d(y2, order, shape)

    @staticmethod
    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        order, shape, rl, per_row = ctx.layout
        need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with forward_backend(ctx):
            dx2, db = _ops.bias_leaky_relu_bwd(dy.permute(order).reshape(rl), saved, ctx.slope, per_row,
                                               ctx.C, ctx.x_dtype, need_dx, need_db)
        return (_from_2d(dx2, order, shape) if need_dx else None,
                db.to(ctx.bias_dtype) if need_db else None, None, None)

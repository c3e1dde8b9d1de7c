"""bias + Leaky ReLU: an autograd.Function over ``fusedstab::bias_leaky_relu_fwd`` / ``_bwd``."""
from __future__ import annotations

import torch

from ..ops.bias_leaky_relu import from_2d, memory_order_2d, saves_mask, to_2d
from .common import forward_backend, remember_backend

_ops = torch.ops.fusedstab


def saved_for_backward(y, mask, slope):
    """What backward reads: y (so an in-place op on y before backward raises autograd's
    version-counter error, as after torch's relu), or for a negative slope the sign mask."""
    return mask if saves_mask(slope) else y


class BiasLeakyReLUFunction(torch.autograd.Function):
    """``BiasLeakyReLUFunction.apply(x, bias, negative_slope, dim) -> leaky_relu(x + bias)``, the bias
    (or None) broadcast along ``dim`` (a non-negative dim of x)."""

    @staticmethod
    def forward(ctx, x, bias, negative_slope, dim):
        y, mask = _ops.bias_leaky_relu_fwd(x, bias, negative_slope, dim)
        remember_backend(ctx)
        ctx.layout, ctx.slope, ctx.x_dtype = memory_order_2d(x, dim), negative_slope, x.dtype
        ctx.bias_dtype, ctx.C = (None, 1) if bias is None else (bias.dtype, bias.shape[0])
        ctx.save_for_backward(saved_for_backward(y, mask, negative_slope))
        return y

    @staticmethod
    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        order, shape, rl, per_row = ctx.layout
        if not saves_mask(ctx.slope):
            saved = to_2d(saved, order, rl)
        need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with forward_backend(ctx):
            dx2, db = _ops.bias_leaky_relu_bwd(to_2d(dy, order, rl), saved, ctx.slope, per_row, ctx.C, ctx.x_dtype,
                                               need_dx, need_db)
        return (from_2d(dx2, order, shape) if need_dx else None,
                db.to(ctx.bias_dtype) if need_db else None, None, None)

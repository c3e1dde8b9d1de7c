"""GroupNorm (+ activation): an autograd.Function over ``fusedstab::group_norm_fwd`` / ``_bwd``."""
from __future__ import annotations

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fusedstab.*)
from .common import forward_backend, layout_in_place, remember_backend

_ops = torch.ops.fusedstab


class GroupNormFunction(torch.autograd.Function):
    """``GroupNormFunction.apply(input, num_groups, weight, bias, eps, activation, negative_slope)
    -> act(group_norm(input))``, activation one of "none", "relu", "leaky_relu", "silu"."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation, negative_slope):
        x = layout_in_place(x)
        y, mean, rstd = _ops.group_norm_fwd(x, weight, bias, num_groups, eps, activation, negative_slope)
        remember_backend(ctx)
        ctx.args = (num_groups, activation, negative_slope)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        with forward_backend(ctx):
            dx, dw, db = _ops.group_norm_bwd(dy, x, w, b, mean, rstd, *ctx.args)
        return (dx, None, None if w is None else dw.to(w.dtype),
                None if b is None else db.to(b.dtype), None, None, None)

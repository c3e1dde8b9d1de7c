"""GroupNorm (+ activation): an autograd.Function over ``fusedstab::group_norm_fwd`` / ``_bwd``."""
from __future__ import annotations

import torch

from .. import ops  # noqa: F401  (registers torch.ops.fusedstab.*)
from .common import channels_view, forward_backend, remember_backend

_ops = torch.ops.fusedstab


class GroupNormFunction(torch.autograd.Function):
    """``GroupNormFunction.apply(input, num_groups, weight, bias, eps, activation, negative_slope)
    -> act(group_norm(input))``, activation one of "none", "relu", "leaky_relu", "silu"."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation, negative_slope):
        x3 = channels_view(x)
        y3, mean, rstd = _ops.group_norm_fwd(x3, weight, bias, num_groups, eps, activation, negative_slope)
        remember_backend(ctx)
        ctx.args = (num_groups, activation, negative_slope)
        ctx.save_for_backward(x3, weight, bias, mean, rstd)
        return y3.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x3, w, b, mean, rstd = ctx.saved_tensors
        with forward_backend(ctx):
            dx3, dw, db = _ops.group_norm_bwd(dy.reshape(x3.shape), x3, w, b, mean, rstd, *ctx.args)
        return (dx3.view(dy.shape), None, None if w is None else dw.to(w.dtype),
                None if b is None else db.to(b.dtype), None, None, None)

"""Linear + bias + Leaky ReLU: an autograd.Function over ``fusedstab::linear_leaky_relu_fwd``, with
``bias_leaky_relu_bwd`` and two matmuls for backward."""
from __future__ import annotations

import math

import torch

from .bias_leaky_relu import saved_for_backward
from .common import forward_backend, remember_backend

_ops = torch.ops.fusedstab


class LinearLeakyReLUFunction(torch.autograd.Function):
    """``LinearLeakyReLUFunction.apply(x, weight, bias, negative_slope) -> leaky_relu(x @ weight.T + bias)``
    for x (*, K), weight (N, K), bias (N,) or None. Backward: one pass turns dy into dz and dbias,
    then dz @ weight and dz.T @ x (cuBLAS through torch)."""

    @staticmethod
    def forward(ctx, x, weight, bias, negative_slope):
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        y2, mask = _ops.linear_leaky_relu_fwd(x2, weight, bias, negative_slope)
        remember_backend(ctx)
        ctx.slope, ctx.x_shape = negative_slope, x.shape
        ctx.save_for_backward(x2, weight, saved_for_backward(y2, mask, negative_slope))
        return y2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        N = weight.shape[0]
        with forward_backend(ctx):
            dz, db = _ops.bias_leaky_relu_bwd(dy.reshape(x2.shape[0], N), saved, ctx.slope, False, N, x2.dtype,
                                              need_x or need_w, need_b)
        dx = (dz @ weight).view(ctx.x_shape) if need_x else None
        dw = dz.t() @ x2 if need_w else None
        return dx, dw, db.to(x2.dtype) if need_b else None, None

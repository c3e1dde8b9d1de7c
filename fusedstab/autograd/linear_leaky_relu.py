"""Linear + bias + Leaky ReLU: an autograd.Function over ``fusedstab::linear_leaky_relu_fwd``, with
``bias_leaky_relu_bwd`` and two matmuls for backward."""
from __future__ import annotations

import math

import torch

from ..ops.bias_leaky_relu import saves_mask
from .bias_leaky_relu import saved_for_backward
from .common import forward_backend, remember_backend

_ops = torch.ops.fusedstab


class LinearLeakyReLUFunction(torch.autograd.Function):
    """``LinearLeakyReLUFunction.apply(x, weight, bias, negative_slope) -> leaky_relu(x @ weight.T + bias)``
    for x (*, K), weight (N, K), bias (N,) or None. Backward: one pass turns dy into dz and dbias,
    then dz @ weight and dz.T @ x (cuBLAS through torch)."""

    @staticmethod
    def forward(ctx, x, weight, bias, negative_slope):
        y, mask = _ops.linear_leaky_relu_fwd(x, weight, bias, negative_slope)
        remember_backend(ctx)
        ctx.slope = negative_slope
        ctx.save_for_backward(x, weight, saved_for_backward(y, mask, negative_slope))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        M, N = math.prod(x.shape[:-1]), weight.shape[0]
        x2 = x.reshape(M, x.shape[-1])
        if not saves_mask(ctx.slope):
            saved = saved.view(M, N)
        with forward_backend(ctx):
            dz, db = _ops.bias_leaky_relu_bwd(dy.reshape(M, N), saved, ctx.slope, False, N, x.dtype,
                                              need_x or need_w, need_b)
        dx = (dz @ weight).view(x.shape) if need_x else None
        dw = dz.t() @ x2 if need_w else None
        return dx, dw, db.to(x.dtype) if need_b else None, None

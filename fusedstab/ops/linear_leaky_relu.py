"""Linear + bias + Leaky ReLU as a torch.library custom op.

``fusedstab::linear_leaky_relu_fwd(x, weight, bias, slope) -> (y, mask)``

x is the caller's (*, K) with any strides, weight (N, K), bias (N,) or None, all of one dtype. y is
(*, N), contiguous: the op's own tensor, so that a user may modify it in place. Every backend sees the
(M, K) rows of x (any strides), y's (M, N) view, and the mask of ``bias_leaky_relu_fwd`` on
x @ weight.T with a per-column bias, so the backward is ``bias_leaky_relu_bwd`` on the (M, N) rows
followed by two matmuls (fusedstab.autograd). Every backend sees M, N >= 1 and a contiguous bias; K
may be 0.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..numerics import acc_dtype, unsupported
from .bias_leaky_relu import activate_into, linear_outputs, saves_mask


@torch.library.custom_op("fusedstab::linear_leaky_relu_fwd", mutates_args=())
def linear_leaky_relu_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], slope: float
                          ) -> tuple[Tensor, Tensor]:
    y, mask = linear_outputs(x, weight.shape[0], slope)
    if y.numel():
        M, N = math.prod(x.shape[:-1]), weight.shape[0]
        backend.dispatch("linear_leaky_relu_fwd", x.device.type, (y.view(M, N), mask), x.reshape(M, x.shape[-1]),
                         weight, None if bias is None else bias.contiguous(), slope)
    return y, mask


@linear_leaky_relu_fwd.register_fake
def _(x, weight, bias, slope):
    return linear_outputs(x, weight.shape[0], slope)


def _linear_torch(outs, x, weight, bias, slope):
    z = torch.nn.functional.linear(x, weight, bias)
    activate_into(outs, z.to(acc_dtype(z.dtype)), slope)


def _matmul_ok(x, weight, bias, slope) -> str | None:
    if x.dtype == torch.float64 and x.device.type == "cuda":
        return "fp64 matmuls are left to cuBLAS (the torch backend)"
    return unsupported((x,), what="the triton kernels")


def _linear_triton(outs, x, weight, bias, slope):
    from ..kernels import linear_leaky_relu as K

    y, mask = outs
    K.linear_leaky_relu(x, weight, bias, y, mask if saves_mask(slope) else None, slope)


backend.register("linear_leaky_relu_fwd", "torch", _linear_torch)
backend.register("linear_leaky_relu_fwd", "triton", _linear_triton, _matmul_ok)

"""bias + Leaky ReLU in one kernel."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..autograd import BiasLeakyReLUFunction
from .checks import check_act_input, check_bias, type_name


def bias_leaky_relu(x: Tensor, bias: Optional[Tensor], negative_slope: float = 0.01, dim: int = -1) -> Tensor:
    """``leaky_relu(x + bias)`` in one kernel, the bias (C,) broadcast along ``dim`` of x: dim=-1 for a
    Linear output, dim=1 for an NCHW convolution output (channels_last is read and written in place).

    Output dtype is torch's for ``x + bias`` (promoted), with x's memory layout. Backward saves the
    output, or a 1-bit mask for negative_slope < 0, and gives dx and a deterministic dbias in one pass.
    ``bias=None`` is leaky_relu alone.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"bias_leaky_relu(): argument 'input' must be Tensor, not {type(x).__name__}")
    nd = x.dim()
    if nd == 0:
        raise IndexError("bias_leaky_relu: input must have at least one dimension, got a 0-d tensor")
    if not -nd <= dim < nd:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-nd}, {nd - 1}], but got {dim})")
    dim %= nd
    if bias is not None:
        check_bias("bias_leaky_relu", bias, x.shape[dim], x, f"the size of input dimension {dim}")
        # x + bias as torch promotes it: an integer side takes the other's floating dtype.
        dt = torch.promote_types(x.dtype, bias.dtype)
        if not dt.is_floating_point:  # what torch's leaky_relu raises for x + bias of this dtype
            raise NotImplementedError(f'"bias_leaky_relu" not implemented for \'{type_name(dt)}\'')
        x = x if x.is_floating_point() else x.to(dt)
        bias = bias if bias.is_floating_point() else bias.to(dt)
    slope = check_act_input("bias_leaky_relu", x, negative_slope)
    return BiasLeakyReLUFunction.apply(x, bias, slope, dim)

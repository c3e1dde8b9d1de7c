"""Linear + bias + Leaky ReLU: a matmul with the bias and the activation in its epilogue."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..autograd import LinearLeakyReLUFunction
from .checks import check_act_input, check_bias


def linear_leaky_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      negative_slope: float = 0.01) -> Tensor:
    """``leaky_relu(linear(x, weight, bias))`` from one Triton matmul with the bias and the activation
    in its epilogue; backward fuses the activation's gradient and dbias into one pass before the two
    gradient matmuls. x (*, in_features), weight (out_features, in_features), bias (out_features,).

    fp32 uses tf32 tensor cores where torch's matmuls may (``torch.backends.cuda.matmul.allow_tf32``),
    else exact fp32. Under autocast the inputs are cast as ``torch.nn.functional.linear``'s are.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"linear_leaky_relu(): argument 'input' must be Tensor, not {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"linear_leaky_relu(): argument 'weight' must be Tensor, not {type(weight).__name__}")
    if weight.dim() != 2:
        raise RuntimeError(f"linear_leaky_relu: weight must be 2-D (out_features, in_features), got {weight.dim()}-D")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        m = "x".join(map(str, (math.prod(x.shape[:-1]), x.shape[-1]))) if x.dim() else "0-d"
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({m} and "
                           f"{weight.shape[1]}x{weight.shape[0]})")
    if weight.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {weight.device}!")
    if bias is not None:
        check_bias("linear_leaky_relu", bias, weight.shape[0], x, "out_features")
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return linear_leaky_relu(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), negative_slope)
    # As F.linear: mixed dtypes are refused first; same-dtype integers then fail in leaky_relu.
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"expected input and {what} to have the same dtype, but got: {x.dtype} != {t.dtype}")
    slope = check_act_input("linear_leaky_relu", x, negative_slope)
    return LinearLeakyReLUFunction.apply(x, weight, bias, slope)

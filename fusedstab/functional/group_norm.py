"""GroupNorm (+ a fused activation) with torch.nn.functional's signature and errors."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..autograd import GroupNormFunction
from .checks import check_activation, check_param_dtypes, type_name


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """Drop-in for ``torch.nn.functional.group_norm``, then ``activation`` (None, "relu", "leaky_relu"
    with ``negative_slope``, "silu") in the same kernel, forward and backward.

    Input (N, C, *): NCHW and channels_last(_3d) are read in place and the output keeps the layout;
    each group's reduction is split across programs, so batch 1 fills the GPU. Statistics in fp32
    (fp64 for fp64 input); dweight and dbias are deterministic.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"group_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    act, slope = check_activation(activation, negative_slope)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    C = input.shape[1]
    if num_groups <= 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    if C % num_groups:
        raise RuntimeError("Expected number of channels in input to be divisible by num_groups, but got input "
                           f"of shape {list(input.shape)} and num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != C:
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in "
                               f"input, but got {name} of shape {list(p.shape)} and input of shape "
                               f"{list(input.shape)}")
        if p.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{input.device} and {p.device}!")
    if not input.is_floating_point() and (weight is not None or bias is not None):
        raise RuntimeError("mixed dtype: all inputs must share same datatype (input is "
                           f"{input.dtype}, a weight or bias was given)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"group_norm" not implemented for \'{type_name(input.dtype)}\'')
    check_param_dtypes("group_norm", input, {"weight": weight, "bias": bias})
    return GroupNormFunction.apply(input, int(num_groups), weight, bias, float(eps), act, slope)

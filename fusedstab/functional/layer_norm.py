"""LayerNorm, RMSNorm and the fused residual add + norm, with torch.nn.functional's signatures and errors."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..autograd import AddLayerNormFunction, LayerNormFunction, RMSNormFunction
from ..numerics import acc_dtype
from .checks import check_param_dtypes, type_name


def _check_norm_args(name: str, input: Tensor, normalized_shape, params: dict) -> tuple:
    """Raise what torch raises for bad input (same exception types, similar messages)."""
    if isinstance(normalized_shape, numbers.Integral):
        raise TypeError(f"{name}(): argument 'normalized_shape' (position 2) must be tuple of ints, not int")
    shape = tuple(int(d) for d in normalized_shape)
    if not shape:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
                           f"least one element, but got normalized_shape = {list(shape)}")
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dim() < len(shape) and name == "rms_norm":
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions (normalized_shape="
                         f"{list(shape)}), but got {input.dim()}")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size{list(input.shape)}")
    if not input.is_floating_point() and name == "layer_norm" and any(p is not None for p in params.values()):
        raise RuntimeError("mixed dtype: all inputs must share same datatype (input is "
                           f"{input.dtype}, a floating-point weight or bias was given)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"{name}" not implemented for \'{type_name(input.dtype)}\'')
    for pname, p in params.items():
        if p is None:
            continue
        if tuple(p.shape) != shape:
            raise RuntimeError(f"Expected {pname} to be of same shape as normalized_shape, but got {pname} "
                               f"of shape {list(p.shape)} and normalized_shape = {list(shape)}")
        if p.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                               f"devices, {input.device} and {p.device}!")
        if not p.is_floating_point():
            raise RuntimeError(f"expected {pname} to have a floating-point dtype, got {p.dtype}")
    check_param_dtypes(name, input, params)
    return shape


def _autocast_to_fp32(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.is_autocast_enabled("cuda")


def _float(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.float()


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Drop-in for ``torch.nn.functional.layer_norm``, one fused kernel forward and backward."""
    shape = _check_norm_args("layer_norm", input, normalized_shape, {"weight": weight, "bias": bias})
    if _autocast_to_fp32(input):
        # CUDA autocast runs layer_norm in fp32 (its fp32 op list): same numbers and output dtype.
        with torch.autocast("cuda", enabled=False):
            return layer_norm(input.float(), shape, _float(weight), _float(bias), eps)
    return LayerNormFunction.apply(input, shape, weight, bias, float(eps))


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.rms_norm``; eps=None means the machine epsilon of the
    accumulation dtype (fp32 for fp16/bf16/fp32 input, fp64 for fp64), as torch does."""
    shape = _check_norm_args("rms_norm", input, normalized_shape, {"weight": weight})
    if eps is None:
        eps = torch.finfo(acc_dtype(input.dtype)).eps
    return RMSNormFunction.apply(input, shape, weight, float(eps))


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: Sequence[int],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: Optional[float] = 1e-5, rms: bool = False) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` from one kernel: the pre-norm block's residual add.

    ``norm`` is layer_norm, or rms_norm when ``rms`` (then ``bias`` must be None and eps=None means
    rms_norm's default). x + residual has the promoted dtype of the two; the normalized output has
    x's dtype. Gradients flow to x, residual, weight and bias.
    """
    params = {"weight": weight} if rms else {"weight": weight, "bias": bias}
    shape = _check_norm_args("rms_norm" if rms else "layer_norm", x, normalized_shape, params)
    if rms and bias is not None:
        raise ValueError("add_layer_norm(rms=True) takes no bias: RMSNorm has none")
    if not isinstance(residual, Tensor):
        raise TypeError(f"add_layer_norm(): argument 'residual' must be Tensor, not {type(residual).__name__}")
    if residual.shape != x.shape:
        raise RuntimeError(f"add_layer_norm: residual of size {list(residual.shape)} must have the size of "
                           f"x, {list(x.shape)}")
    if residual.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {residual.device}!")
    if not residual.is_floating_point():
        raise NotImplementedError(f'"add_layer_norm" not implemented for residual of type {residual.dtype}')
    if eps is None:
        if not rms:
            raise TypeError("add_layer_norm: eps=None is only meaningful with rms=True")
        eps = torch.finfo(acc_dtype(torch.promote_types(x.dtype, residual.dtype))).eps
    return AddLayerNormFunction.apply(x, residual, shape, weight, bias, float(eps), bool(rms))

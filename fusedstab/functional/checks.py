"""Argument checks that several functions share, raising what torch raises (same exception types)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor


def type_name(dtype: torch.dtype) -> str:
    return {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
            torch.complex128: "ComplexDouble"}.get(dtype, str(dtype))


def check_act_input(name: str, x, negative_slope) -> float:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be Tensor, not {type(x).__name__}")
    if not x.is_floating_point():  # torch's leaky_relu kernels raise this for integer/bool/complex
        raise NotImplementedError(f'"{name}" not implemented for \'{type_name(x.dtype)}\'')
    if not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"{name}(): argument 'negative_slope' must be a number, not {type(negative_slope).__name__}")
    return float(negative_slope)


def check_bias(name: str, bias, size: int, x: Tensor, what: str) -> None:
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name}(): argument 'bias' must be Tensor or None, not {type(bias).__name__}")
    if bias.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {bias.device}!")
    if bias.dim() != 1 or bias.shape[0] != size:
        raise RuntimeError(f"{name}: bias of shape {list(bias.shape)} must have shape [{size}] ({what})")


ACTIVATIONS = (None, "relu", "leaky_relu", "silu")


def check_activation(activation, negative_slope) -> tuple[str, float]:
    """(activation name for the ops, slope): None means "none"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a number, not {type(negative_slope).__name__}")
    return activation or "none", float(negative_slope)


_REDUCED = (torch.float16, torch.bfloat16)


def check_param_dtypes(name: str, input: Tensor, params: dict) -> None:
    """The parameter dtype rule of every fusedstab norm (LayerNorm, RMSNorm, GroupNorm, BatchNorm):
    torch's CPU rule, on every device. The given parameters (weight, bias, running statistics) all
    have the input's dtype, or all are float32 for a float16 or bfloat16 input (mixed precision)."""
    dtypes = {p.dtype for p in params.values() if p is not None}
    if dtypes and dtypes != {input.dtype} and not (input.dtype in _REDUCED and dtypes == {torch.float32}):
        given = ", ".join(f"{k} {p.dtype}" for k, p in params.items() if p is not None)
        raise RuntimeError(f"mixed dtype: {name}'s parameters must all have the input's dtype {input.dtype}, or all "
                           f"be float32 for a float16 or bfloat16 input; got {given}")

"""Numerics every layer shares: the accumulation dtype, the dtypes the kernels serve, and Chan's
combine of partial (count, mean, M2). (``reference.py`` is the eager oracle; the C++ kernels share
the same rules through ``csrc/common/numerics.h``.)"""
from __future__ import annotations

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/fp16/bf16, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unsupported(args, dtypes=FLOATS, what: str = "the kernels") -> str | None:
    """Why a backend serving ``dtypes`` cannot take these arguments (a non-empty tensor of another
    dtype), or None."""
    for t in args:
        if isinstance(t, Tensor) and t.numel() and t.dtype not in dtypes:
            return f"dtype {t.dtype} is not supported by {what}"
    return None


def wide_dtypes(x_dtype: torch.dtype) -> set:
    """The dtypes the kernels take beside an x of ``x_dtype`` (parameters, a residual sum): x's own,
    or fp32 for fp16/bf16 x."""
    return {x_dtype} | ({torch.float32} if x_dtype in (torch.float16, torch.bfloat16) else set())


def params_unsupported(x_dtype: torch.dtype, params, what: str = "the kernels") -> str | None:
    """Why kernels that take parameters of x's dtype, or fp32 ones for fp16/bf16 x (the public API's
    rule; a direct op call may pass others), cannot take ``params``, or None."""
    if any(p is not None and p.dtype not in wide_dtypes(x_dtype) for p in params):
        return f"{what} take {x_dtype} input with parameters of its dtype or float32"
    return None


def chan_combine(count: Tensor, mean: Tensor, m2: Tensor, dim: int):
    """(count, mean, M2) of partial sets combined along ``dim`` by Chan et al.'s parallel formula,
    exact for any offset of the values (sets with count 0 contribute nothing)."""
    n = count.sum(dim)
    mu = (count * mean).sum(dim) / n
    return n, mu, m2.sum(dim) + (count * (mean - mu.unsqueeze(dim)) ** 2).sum(dim)

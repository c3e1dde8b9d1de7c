"""The (N, C, S) layouts GroupNorm and BatchNorm kernels read in place: dense NCHW, or dense with the
channels innermost (channels_last / channels_last_3d, and (N, C) input seen as (N, C, 1)). The public
ops bring any other layout to one of these once, so every backend sees only the two."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def channels_inner(x: Tensor) -> bool:
    """x (N, C, S) dense with the channels innermost: channels-last, or (N, C) input as (N, C, 1)."""
    return x.transpose(1, 2).is_contiguous() and (x.shape[2] == 1 or not x.is_contiguous())


def dense(x: Tensor) -> Tensor:
    """x itself when dense NCHW or channels-inner, else a contiguous copy."""
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()


def like(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's strides (a copy only where they differ)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def write_into(out: Tensor, ref: Tensor, fill: Callable[[Tensor], None]) -> Tensor:
    """``fill(buffer)`` with a buffer in ref's layout: ``out`` itself when its strides are ref's, else a
    temporary copied into ``out``."""
    buf = out if out.stride() == ref.stride() else torch.empty_like(ref)
    fill(buf)
    return out if buf is out else out.copy_(buf)

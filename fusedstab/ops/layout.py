"""Layouts the kernels read in place, and the views the public ops hand the backends.

GroupNorm and BatchNorm kernels read an (N, C, S) view: dense NCHW, or dense with the channels
innermost (channels_last / channels_last_3d, and (N, C) input seen as (N, C, 1)). Their public ops
take the caller's (N, C, *) tensor, bring any other layout to one of these once, allocate outputs in
the caller's shape (so that autograd hands the user a tensor of its own, not a view made inside a
custom Function, and in-place ops on it work) and pass the backends the (N, C, S) views of both, so
every backend sees only the two layouts.
"""
from __future__ import annotations

import torch
from torch import Tensor


def in_place_layout(x: Tensor) -> bool:
    """Contiguous and channels_last(_3d): the layouts the autograd Functions pass on as they are (and
    the outputs keep); any other layout reaches the ops as a contiguous copy."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return x.is_contiguous() or (fmt is not None and x.is_contiguous(memory_format=fmt))


def ncs(t: Tensor) -> Tensor:
    """(N, C, S) of t (N, C, *): a view for the layouts of ``channels_first``'s result."""
    return t.unsqueeze(-1) if t.dim() == 2 else t.flatten(2)


def channels_first(x: Tensor) -> Tensor:
    """x (N, C, *) itself when its (N, C, S) view is dense NCHW or dense channels-inner, else a
    contiguous copy. ``torch.empty_like`` of the result has its strides."""
    return x if x.is_contiguous() or x.movedim(1, -1).is_contiguous() else x.contiguous()


def channels_inner(x: Tensor) -> bool:
    """x (N, C, S) dense with the channels innermost: channels-last, or (N, C) input as (N, C, 1)."""
    return x.transpose(1, 2).is_contiguous() and (x.shape[2] == 1 or not x.is_contiguous())


def like(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's strides (a copy only where they differ)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)

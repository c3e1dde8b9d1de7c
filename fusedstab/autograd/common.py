"""What every autograd.Function here shares: running backward on the backend its forward ran on, and
the (N, C, S) / memory-order views the kernels read in place."""
from __future__ import annotations

import contextlib

import torch

from .. import backend


def remember_backend(ctx) -> None:
    """Backward runs where forward ran: re-apply this choice there (autograd's CUDA backward threads
    and a backward() outside the use_backend block would not see it). Compiled graphs read the
    process-wide choice at run time instead."""
    ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()


def forward_backend(ctx):
    """Context manager: the backend remembered by ``remember_backend``."""
    return backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext()


def in_place_layout(x) -> bool:
    """Contiguous and channels_last(_3d): the layouts the kernels read in place and give back."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return x.is_contiguous() or (fmt is not None and x.is_contiguous(memory_format=fmt))


def channels_view(x):
    """(N, C, S) view of x (N, C, *): contiguous and channels_last(_3d) inputs stay views (the kernels
    read them in place with their strides); other layouts are read through a contiguous copy."""
    x = x if in_place_layout(x) else x.contiguous()
    return x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)

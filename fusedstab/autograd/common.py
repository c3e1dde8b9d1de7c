"""What every autograd.Function here shares: running backward on the backend its forward ran on, and
the layouts the kernels read in place."""
from __future__ import annotations

import contextlib

import torch

from .. import backend
from ..ops.layout import in_place_layout


def remember_backend(ctx) -> None:
    """Backward runs where forward ran: re-apply this choice there (autograd's CUDA backward threads
    and a backward() outside the use_backend block would not see it). Compiled graphs read the
    process-wide choice at run time instead."""
    ctx.backend = None if torch.compiler.is_compiling() else backend.get_backend()


def forward_backend(ctx):
    """Context manager: the backend remembered by ``remember_backend``."""
    return backend.use_backend(ctx.backend) if ctx.backend else contextlib.nullcontext()


def layout_in_place(x):
    """x itself when contiguous or channels_last(_3d) (the kernels read it in place and the output keeps
    its layout), else a contiguous copy. The ops take this tensor in the caller's shape and return
    outputs of that shape: never a view made here, which autograd would forbid modifying in place."""
    return x if in_place_layout(x) else x.contiguous()

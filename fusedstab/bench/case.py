"""What one benchmark case is: an op at one shape, the callables that compute it, the bytes it must move.

A new op adds a module named after it (``fusedstab/bench/<op>.py``) with a function
``<op>(cfg) -> list[Case]`` and one entry in ``fusedstab.bench.OPS``.

Modes: autograd ops are timed forward, backward, and both (``AUTOGRAD_MODES``, the default). An op
that is no autograd function declares its own modes and how a provider is called in each (the case's
``thunk``), e.g. gradient clipping: "norm" (the total norm only) and "clip" (the whole clip).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

AUTOGRAD_MODES = ("fwd", "bwd", "fwd+bwd")
CLIP_MODES = ("norm", "clip")  # fusedstab.bench.clip_grad_norm
TRAIN_MODES = ("step",)  # fusedstab.bench.train_step: forward, backward, clip and optimizer step
MODES = AUTOGRAD_MODES + CLIP_MODES + TRAIN_MODES  # every mode some case may declare (the CLI's choices)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# How case descriptions name layouts and fused activations ("4x64x32x32 channels_last +SiLU").
LAYOUT_NAME = {"nchw": "NCHW", "contiguous": "NCHW", "channels_last": "channels_last", "nc": ""}
ACT_SUFFIX = {None: "", "relu": " +ReLU", "silu": " +SiLU"}


@dataclass
class Config:
    """What the user asked for; case generators turn it into shapes."""

    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    quick: bool = False
    tiny: bool = False  # one tiny shape per op, timed once: the end-to-end test of the harness itself
    compile: bool = True
    rows_n: tuple[int, ...] | None = None  # override the sweep of row lengths (norms)
    target_mib: int | None = None  # size of the main activation tensor; None: device default


@dataclass
class Provider:
    """One implementation. ``context`` is entered around building, warming up and timing it,
    e.g. ``fusedstab.use_backend("triton")`` (so backward dispatch sees the same choice).
    ``check=False``: a yardstick that computes something else by construction (the bare matmul next
    to Linear + Leaky ReLU); its result is not compared with eager's, and its rows have no error."""

    fn: Callable
    context: Callable[[], ContextManager] = contextlib.nullcontext
    modes: tuple[str, ...] | None = None  # the case's modes this provider serves; None: all of them
    check: bool = True  # compare its first result with eager's (a mismatch becomes a note)


@dataclass
class Case:
    op: str
    params: dict  # shape and dtype, e.g. {"M": 4096, "N": 8192}; becomes part of each result row
    make_inputs: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]]
    """Fresh (inputs, grad_outputs). Every input requires grad; providers take ``*inputs``."""
    providers: dict[str, Provider]
    bytes_moved: dict[str, int]  # mode -> fewest bytes (each input read once, each output written once)
    flops: dict[str, int] | None = None  # mode -> flops, for compute-bound ops (attention, matmul)
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it is not in this case
    modes: tuple[str, ...] = AUTOGRAD_MODES
    thunk: Callable[[Callable, list, list, str], Callable[[], object]] | None = None
    """``(provider fn, inputs, grads, mode) -> zero-argument callable`` that is timed; its first call's
    result is checked against eager's. None: ``timing.make_thunk`` (the autograd modes)."""
    count_launches: bool = False  # on CUDA: count kernel launches and host syncs of one call per row
    desc: str = ""
    """The shape in the units users use, under the op's ``OpInfo.shape`` heading: "64 x 512"
    (tokens x hidden), "4x16x16x16, 4 groups, channels_last +SiLU", "gpt2-tiny: 28 tensors, 43.9K params"."""
    x: float | None = None
    """Where the case sits on its plot's size axis (``OpInfo.x`` names it), e.g. the hidden size;
    None: the op's cases are categories (grouped bars, labelled by ``desc``)."""
    series: str = ""
    """Cases of one op with the same ``series`` and different ``x`` are joined by a line."""

    @property
    def label(self) -> str:
        return f"{self.op}[" + ",".join(f"{k}={v}" for k, v in self.params.items()) + "]"

    @property
    def title(self) -> str:
        """What progress lines show: the op and its shape in users' units."""
        return f"{self.op} {self.desc}" if self.desc else self.label


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def elt_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def count(n: float) -> str:
    """1234 -> "1.2K", 124439808 -> "124M": parameter and element counts as people say them."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(int(n))


def randn_inputs(shapes: list[tuple[int, ...]], dtype, device, grad_shapes: list[tuple[int, ...]]):
    """Random normal inputs that require grad, and random grad_outputs: never zeros (kernels may
    shortcut them), and seeded so every provider sees the same values (outputs are compared)."""
    g = torch.Generator(device).manual_seed(0)
    rand = lambda s: torch.randn(s, dtype=dtype, device=device, generator=g)
    inputs = [rand(s).requires_grad_() for s in shapes]
    grads = [rand(s) for s in grad_shapes]
    return inputs, grads

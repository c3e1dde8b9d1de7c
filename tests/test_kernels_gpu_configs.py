"""The GPU's launch configurations, run by the interpreter (issue 13).

Under ``common.simulate_gpu()`` the launchers choose the grids, splits and tiles an H100 gets (132
SMs), whatever the tensors' device; the interpreter runs those launches on CPU tensors. So the
multi-program paths that only a GPU takes (rows split across programs, channel tiles spread over
programs, key ranges split, group loops split) are checked here against the torch backend, at small
shapes. Every test is marked ``program_order``: it runs with the interpreter's programs in order and
reversed (tests/conftest.py), so a kernel that relies on program order fails on CPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

import fusedstab
import fusedstab.functional as FF
from fusedstab.kernels import common, introspect

pytestmark = [pytest.mark.program_order,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the interpreter")]


def _both(fn, *inputs):
    """fn's outputs and input gradients on the triton backend (H100 launches) and the torch backend."""
    out = []
    for backend in ("triton", "torch"):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        with fusedstab.use_backend(backend), common.simulate_gpu():
            y = fn(*xs)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        out.append((y.detach(), [t.grad for t in xs if t.requires_grad]))
    return out


def _close(got, want, rtol=1e-4, atol=1e-4):
    (y, gs), (ry, rgs) = got, want
    torch.testing.assert_close(y, ry, rtol=rtol, atol=atol)
    for g, rg in zip(gs, rgs):
        torch.testing.assert_close(g, rg, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the plugin itself
@triton.jit
def _order_kernel(COUNTER, OUT):
    slot = tl.atomic_add(COUNTER, 1)
    tl.store(OUT + slot, tl.program_id(0))


def test_program_order_plugin(_program_order):
    counter, out = torch.zeros(1, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)
    _order_kernel[(5,)](counter, out)
    expect = list(range(5)) if _program_order == "in_order" else list(range(4, -1, -1))
    assert out.tolist() == expect


# ----------------------------------------------------------------------------- GroupNorm
GN_SHAPES = [  # (shape, G, channels_last): channel tiles spread over programs, (N, C) rows
    ((1, 512, 16, 16), 2, False),   # 32 channel tiles x 1 spatial tile per group
    ((2, 96, 9, 7), 3, False),      # odd sizes
    ((3, 64, 5, 5), 4, True),       # channels_last: per-sample BatchNorm kernels
    ((37, 48), 6, False),           # (N, C): the rows kernels
    ((5, 24, 1, 1), 3, False),
]


@pytest.mark.parametrize("shape,G,cl", GN_SHAPES, ids=[f"{'x'.join(map(str, s))}-G{g}{'-cl' if c else ''}"
                                                       for s, g, c in GN_SHAPES])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_group_norm(shape, G, cl, act):
    x = torch.randn(shape) * 2 + 3
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    for t in (x, w, b):
        t.requires_grad_()
    fn = lambda x, w, b: FF.group_norm(x, G, w, b, activation=None if act == "none" else act)  # noqa: E731
    got, want = _both(fn, x, w, b)
    _close(got, want)


def test_group_norm_batch1_fills_the_gpu():
    """Batch 1 at diffusion shapes: the four NCHW kernels spread channel tiles over programs (the
    split was capped by the spatial tiles: 32 and 128 programs on 132 SMs)."""
    for shape in ((1, 2048, 16, 16, 32, False), (1, 512, 64, 64, 32, False)):
        cases = introspect.group_norm_cases([shape], [torch.bfloat16], acts=("silu",))
        for launch in introspect.run_cases(cases):
            if launch.name != "_combine_kernel":
                programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
                assert programs >= common.H100.sm_count, (shape, launch.name, launch.grid)

"""The ``cuda`` backend's GroupNorm and BatchNorm kernels on a GPU (marked ``gpu``; skipped elsewhere):
what the registry-driven op tests (tests/test_group_norm.py, test_batch_norm.py, which run every
backend on CUDA: every dtype, odd sizes, layouts, activations, mixed dtypes) leave out.

- batch-1 diffusion shapes, NCHW and channels_last: ``cuda`` and ``triton`` on the same inputs against
  a float64 truth and eager torch (``helpers.assert_matches``: fp16/bf16 at most 2x torch's error);
- bitwise determinism of every output and gradient across runs (per-split partials, fixed-order
  combines, no atomics);
- tensors over 2^31 elements (int64 offsets), NCHW GroupNorm and channels-last BatchNorm, checked on
  the last group / channel where the offsets are largest; skipped without the free memory.
The kernels' arithmetic also runs on CPU through tests/test_cuda_channel_norm_emu.py.
"""
from __future__ import annotations

import pytest
import torch

import fusedstab
from fusedstab import functional as FF
from fusedstab import reference
from helpers import assert_matches, max_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_ext")]
DEV = "cuda"
OPS = torch.ops.fusedstab
CL = torch.channels_last


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def _inputs(shape, dtype, fmt, seed, pdtype=torch.float32):
    g = torch.Generator(device=DEV).manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, device=DEV, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    w = (torch.rand(C, device=DEV, generator=g) + 0.5).to(pdtype)
    b = torch.randn(C, device=DEV, generator=g).to(pdtype)
    dy = torch.randn(shape, device=DEV, generator=g).to(dtype).contiguous(memory_format=fmt)
    return x, w, b, dy


def _gn(G, act):
    return lambda x, w, b: FF.group_norm(x, G, w, b, 1e-5, act)


def _gn_torch(G, act):
    """Eager torch in x's dtype (parameters cast to it), then the activation."""
    return lambda x, w, b: reference.group_norm(x, G, w.to(x.dtype), b.to(x.dtype), 1e-5, act)


def _bn(act):
    return lambda x, w, b: FF.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, act)


def _bn_torch(act):
    return lambda x, w, b: reference.batch_norm(x, None, None, w.to(x.dtype), b.to(x.dtype), True, 0.1, 1e-5, act)


def _run(fn, x, w, b, dy, backend):
    """y and the gradients (dx, dweight, dbias) of sum(y * dy) under backend."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    with fusedstab.use_backend(backend):
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach(), *grads]


def _check(fn, ref, x, w, b, dy, what):
    """cuda and triton against the float64 truth and eager torch; cuda keeps x's memory format."""
    got = _run(fn, x, w, b, dy, "cuda")
    tri = _run(fn, x, w, b, dy, "triton")
    truth = _run(ref, x.double(), w.double(), b.double(), dy.double(), "torch")
    eager = _run(ref, x, w, b, dy, "torch")
    for name, c, tr, t, e in zip(("y", "dx", "dweight", "dbias"), got, tri, truth, eager, strict=True):
        assert_matches(c, t, e, f"{what} {name} (cuda)")
        assert_matches(tr, t, e, f"{what} {name} (triton, same inputs)")
    fmt = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt), what


# Stable-diffusion-like UNet maps at batch 1 (GroupNorm 32 groups), a VAE decoder map, and odd ones.
GN_SHAPES = [(1, 320, 64, 64), (1, 1280, 16, 16), (1, 128, 256, 256), (1, 640, 33, 31), (1, 96, 7, 5)]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_group_norm_batch1(shape, fmt, dtype):
    x, w, b, dy = _inputs(shape, dtype, fmt, seed=sum(shape))
    _check(_gn(32, "silu"), _gn_torch(32, "silu"), x, w, b, dy, f"group_norm {shape} {fmt} {dtype}")


BN_SHAPES = [(1, 64, 128, 128), (8, 256, 28, 28), (3, 37, 19, 23), (4096, 1000, 1, 1)]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_shapes(shape, fmt):
    x, w, b, dy = _inputs(shape, torch.bfloat16, fmt, seed=sum(shape))
    _check(_bn("relu"), _bn_torch("relu"), x, w, b, dy, f"batch_norm {shape} {fmt}")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("op", ["group_norm", "batch_norm"])
@pytest.mark.parametrize("shape", [(1, 512, 64, 64), (16, 64, 56, 56), (2, 96, 17, 3)], ids=str)
def test_deterministic(op, shape, fmt):
    """Forward and backward three times on the same inputs: every output bit for bit."""
    x, w, b, dy = _inputs(shape, torch.bfloat16, fmt, seed=7)
    fn = _gn(32, "silu") if op == "group_norm" else _bn("silu")
    first = _run(fn, x, w, b, dy, "cuda")
    for _ in range(2):
        for u, v in zip(first, _run(fn, x, w, b, dy, "cuda"), strict=True):
            assert torch.equal(u, v), op


def _big(nbytes: int):
    """Skip unless the big tensors (nbytes) and 4 GiB for the float64 checks fit."""
    if _free_bytes() < nbytes + (4 << 30):
        pytest.skip(f"needs about {(nbytes >> 30) + 4} GiB of free GPU memory")


def test_group_norm_over_2_31_elements():
    """NCHW, 2 x 64 x (2^24 + 8) bf16 (2^31 + 1024 elements): the last sample's last group (2 channels
    of 2^24 + 8, offsets past 2^31) against float64, forward and backward (dy = y)."""
    N, C, S, G = 2, 64, 2**24 + 8, 32
    _big(3 * N * C * S * 2)  # x, y, dx
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.empty(N, C, S, device=DEV, dtype=torch.bfloat16).normal_(generator=g)
    w = torch.rand(C, device=DEV, generator=g) + 0.5
    b = torch.randn(C, device=DEV, generator=g)
    with fusedstab.use_backend("cuda"):
        y, mean, rstd = OPS.group_norm_fwd(x, w, b, G, 1e-5, "none", 0.01)
        dx, dw, db = OPS.group_norm_bwd(y, x, w, b, mean, rstd, G, "none", 0.01)
    sl = (slice(N - 1, N), slice(C - 2, C))
    x64, y64 = x[sl].double(), y[sl].double()
    ry, rmean, rrstd = reference.group_norm_fwd(x64, w[C - 2:].double(), b[C - 2:].double(), 1, 1e-5, "none", 0.01)
    assert max_err(mean[-1, -1], rmean[0, 0]) < 1e-5 and max_err(rstd[-1, -1], rrstd[0, 0]) < 1e-4 * rrstd[0, 0].item()
    assert max_err(y[sl], ry) < 0.02 * max(1.0, ry.abs().max().item())  # bf16: 2^-8 relative
    rdx, _, _ = reference.group_norm_bwd(y64, x64, w[C - 2:].double(), b[C - 2:].double(), rmean, rrstd, 1, "none", 0.01)
    assert max_err(dx[sl], rdx) < 0.05 * max(1.0, rdx.abs().max().item())
    assert torch.isfinite(dw).all() and torch.isfinite(db).all()
    del x, y, dx, x64, y64
    torch.cuda.empty_cache()


def test_batch_norm_channels_last_over_2_31_elements():
    """Channels-last 8 x 64 x 2048 x 2049 bf16 (2^31 + 2^20 elements): the last channel's statistics,
    the normalized values and the backward sums of the last rows against float64."""
    N, C, H, W = 8, 64, 2048, 2049
    _big(3 * N * C * H * W * 2)  # x, y, dx
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.empty(N, H, W, C, device=DEV, dtype=torch.bfloat16).normal_(generator=g).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=CL)
    w = torch.rand(C, device=DEV, generator=g) + 0.5
    b = torch.randn(C, device=DEV, generator=g)
    with fusedstab.use_backend("cuda"):
        stats = OPS.batch_norm_stats(x)
        count, mean, m2 = stats
        rstd = torch.rsqrt(m2 / count + 1e-5)
        y = OPS.batch_norm_elemt(x, w, b, mean, rstd, "none", 0.01)
        sums = OPS.batch_norm_bwd_reduce(y, x, w, b, mean, rstd, "none", 0.01)
        dx = OPS.batch_norm_bwd_elemt(y, x, w, b, mean, rstd, sums / count, "none", 0.01)
    assert y.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)
    xc = x[:, C - 1].double()  # the last channel: a strided gather of 2^25 values
    m64 = xc.mean()
    v64 = ((xc - m64) ** 2).sum()
    assert count[-1].item() == N * H * W
    assert abs(mean[-1].item() - m64.item()) < 1e-5 and abs(m2[-1].item() / v64.item() - 1) < 1e-4
    r64 = 1 / torch.sqrt(v64 / (N * H * W) + 1e-5)
    yc = (xc - m64) * r64 * w[-1].double() + b[-1].double()
    assert max_err(y[-1, -1, -4:], yc[-1, -4:]) < 0.02 * max(1.0, yc.abs().max().item())
    dz = y[:, C - 1].double()
    s64 = torch.stack([dz.sum(), (dz * (xc - m64) * r64).sum()])
    assert max_err(sums[:, -1], s64) < 1e-3 * max(1.0, s64.abs().max().item())
    del x, y, dx, xc, dz, yc
    torch.cuda.empty_cache()


def test_glue_rejects_bad_arguments():
    """Direct calls of torch.ops.fusedstab_C with what the public ops never pass: a clear error, no
    launch (csrc/cuda/channel_norm_glue.h's checks)."""
    from fusedstab import extension

    C_ = extension.ops()
    x = torch.randn(2, 8, 5, device=DEV)
    w, b, y = torch.randn(8, device=DEV), torch.randn(8, device=DEV), torch.empty_like(x)
    st = torch.empty(2, 2, device=DEV)
    bad = {
        "num_groups": lambda: C_.group_norm_fwd(x, w, b, 3, 1e-5, "none", 0.0, y, st, st.clone()),
        "float32": lambda: C_.group_norm_fwd(x, w.double(), b, 2, 1e-5, "none", 0.0, y, st, st.clone()),
        "activation": lambda: C_.group_norm_fwd(x, w, b, 2, 1e-5, "gelu", 0.0, y, st, st.clone()),
        "mean": lambda: C_.group_norm_fwd(x, w, b, 2, 1e-5, "none", 0.0, y, st[:1], st.clone()),
        "layout": lambda: C_.group_norm_fwd(x, w, b, 2, 1e-5, "none", 0.0, y.transpose(1, 2).contiguous().transpose(1, 2),
                                            st, st.clone()),
        "dense NCHW or channels-inner": lambda: C_.batch_norm_stats(x[:, :, ::2], torch.empty(3, 8, device=DEV)),
        "CUDA tensor": lambda: C_.batch_norm_elemt(x, w.cpu(), b, w, w, "none", 0.0, y),
        "shape": lambda: C_.batch_norm_bwd_reduce(x, x, w, b, w, w, "none", 0.0, torch.empty(3, 8, device=DEV)),
        "dtype": lambda: C_.batch_norm_bwd_elemt(x.half(), x, w, b, w, w, None, "none", 0.0, y),
    }
    for what, call in bad.items():
        with pytest.raises(RuntimeError, match=what):
            call()

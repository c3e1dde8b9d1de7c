"""The CUDA GroupNorm / BatchNorm kernels without a GPU: csrc/cuda/group_norm.cu, batch_norm.cu and
kernels/channel_norm.cuh, compiled by the host compiler against tests/cuda_emu/emu.h (a CPU emulator of
the CUDA built-ins they use: a launch's blocks one after another, a block's threads as fibers,
__syncthreads and warp shuffles as barriers that every live thread must reach), called through ctypes
(tests/cuda_emu/channel_norm_emu.cpp) and compared with fusedstab.reference in float64 by the rule of
helpers.assert_matches (fp16/bf16: at most 2x the error of the same arithmetic in fp32 rounded once).

The launchers run as written: the test only rewrites ``kernel<<<grid, block, smem, stream>>>(args)``
into a call of the emulator. Covered: both layouts and S = 1, every dtype, fp32 parameters with
fp16/bf16 input, every activation, rows not a multiple of 8 and misaligned bases (element-wise
loads), splits of one to many blocks per output (the SM count the plans see), a 1e4 offset, bitwise
determinism, NaN propagation, and the int64 division. Numbers on a GPU still need the gpu-marked
tests (tests/test_cuda_kernels.py); the emulator shows the index arithmetic, the reductions' orders
and the synchronization, not the hardware's float details (fp32 SiLU uses __expf / __fdividef there).
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fusedstab import reference as R
from helpers import assert_matches

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ACT = {"none": 0, "relu": 1, "leaky_relu": 2, "silu": 3}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)


def emulated(src: Path, dst: Path) -> int:
    """src with every kernel launch rewritten as a call of the emulator; returns how many."""
    text, n = LAUNCH.subn(r"emu::Launch(\2).run(\1, ", src.read_text())
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return n


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    gen = tmp_path_factory.mktemp("cn_emu")
    assert emulated(ROOT / "csrc/cuda/kernels/reduce.cuh", gen / "cuda/kernels/reduce.cuh") == 1
    srcs = [gen / "group_norm.cpp", gen / "batch_norm.cpp"]
    assert emulated(ROOT / "csrc/cuda/group_norm.cu", srcs[0]) > 0
    assert emulated(ROOT / "csrc/cuda/batch_norm.cu", srcs[1]) > 0
    so = gen / "emu.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    f"-I{EMU / 'include'}", f"-I{gen}", f"-I{ROOT / 'csrc'}", *map(str, srcs),
                    str(EMU / "channel_norm_emu.cpp"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    P, I64, D, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.emu_gn_fwd.argtypes = [P] * 6 + [I64] * 4 + [I, D, I, D, I, I, I]
    lib.emu_gn_bwd.argtypes = [P] * 9 + [I64] * 4 + [I, I, D, I, I, I]
    lib.emu_bn_stats.argtypes = [P, P, I64, I64, I64, I, I]
    lib.emu_bn_step.argtypes = [I] + [P] * 8 + [I64] * 3 + [I, I, D, I, I, I]
    lib.emu_divmod.argtypes = [I64, I64, ctypes.POINTER(I64), ctypes.POINTER(I64)]
    yield lib
    lib.emu_set_sms(2)


# ----------------------------------------------------------------------------- calling the launchers
def _p(t):
    return None if t is None else t.data_ptr()


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _p32(p, x):
    return int(p is not None and p.dtype == torch.float32 and x.dtype != torch.float32)


def _nchw(x):  # the glue's layout test: dense NCHW, else channels-inner
    return x.is_contiguous()


def gn_fwd(lib, x, w, b, G, act="none", slope=0.01, eps=1e-5):
    N, C, S = x.shape
    y = torch.empty_like(x)
    mean, rstd = (torch.full((N, G), float("nan"), dtype=_acc(x.dtype)) for _ in range(2))
    assert lib.emu_gn_fwd(_p(x), _p(w), _p(b), _p(y), _p(mean), _p(rstd), N, C, S, G, int(not _nchw(x)), eps,
                          ACT[act], slope, DT[x.dtype], _p32(w, x), _p32(b, x)) == 0
    return y, mean, rstd


def gn_bwd(lib, dy, x, w, b, mean, rstd, G, act="none", slope=0.01):
    N, C, S = x.shape
    dx = torch.empty_like(x)
    dw, db = (torch.full((C,), float("nan"), dtype=mean.dtype) if p is not None else None for p in (w, b))
    assert lib.emu_gn_bwd(_p(dy), _p(x), _p(w), _p(b), _p(mean), _p(rstd), _p(dx), _p(dw), _p(db), N, C, S, G,
                          int(not _nchw(x)), ACT[act], slope, DT[x.dtype], _p32(w, x), _p32(b, x)) == 0
    return dx, dw, db


def _bn_cl(x):  # the glue's choice for BatchNorm: channels-inner unless dense NCHW with S > 1
    return not (_nchw(x) and x.shape[2] > 1)


def bn_stats(lib, x):
    N, C, S = x.shape
    stats = torch.full((3, C), float("nan"), dtype=_acc(x.dtype))
    assert lib.emu_bn_stats(_p(x), _p(stats), N, C, S, int(_bn_cl(x)), DT[x.dtype]) == 0
    return stats


def bn_step(lib, step, dy, x, w, b, mean, rstd, coef, act="none", slope=0.01):
    N, C, S = x.shape
    out = torch.full((2, C), float("nan"), dtype=mean.dtype) if step == 1 else torch.empty_like(x)
    assert lib.emu_bn_step(step, _p(dy), _p(x), _p(w), _p(b), _p(mean), _p(rstd), _p(coef), _p(out), N, C, S,
                           int(_bn_cl(x)), ACT[act], slope, DT[x.dtype], _p32(w, x), _p32(b, x)) == 0
    return out


# ----------------------------------------------------------------------------- inputs
def make(shape, dtype, cl=False, wdtype=None, affine=(True, True), offset=0.5, seed=0):
    """x (N, C, S) as the public op hands it over: dense NCHW, or channels-inner (cl); dy like x."""
    g = torch.Generator().manual_seed(seed)
    N, C, S = shape
    x = torch.randn(N, S, C, generator=g).transpose(1, 2) if cl else torch.randn(N, C, S, generator=g)
    x = (x * 2 + offset).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    dy = torch.empty_like(x).copy_(dy)  # x's strides
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(wdtype or dtype) if affine[0] else None
    b = (0.5 * torch.randn(C, generator=g)).to(wdtype or dtype) if affine[1] else None
    return x, dy, w, b


def check(got, truth, eager, what):
    assert_matches(got, truth, eager, what)


def _d(t):
    return None if t is None else t.double()


# ============================================================================= GroupNorm
GN_SHAPES = [  # (N, C, S), G
    ((2, 6, 35), 3), ((1, 8, 64), 4), ((3, 4, 1), 2), ((2, 5, 9), 5), ((1, 16, 1000), 2), ((2, 12, 17), 1),
    ((1, 64, 300), 32),
]


def _gn_case(lib, shape, G, dtype, cl, act, slope=0.01, wdtype=None, affine=(True, True), offset=0.5):
    x, dy, w, b = make(shape, dtype, cl, wdtype, affine, offset)
    tag = f"gn {shape} G={G} {dtype} cl={cl} act={act}"
    y, mean, rstd = gn_fwd(lib, x, w, b, G, act, slope)
    ty, tm, tr = R.group_norm_fwd(x.double(), _d(w), _d(b), G, 1e-5, act, slope)
    ey, em, er = R.group_norm_fwd(x, w, b, G, 1e-5, act, slope)
    check(y, ty, ey, tag + " y")
    check(mean, tm, em, tag + " mean")
    check(rstd, tr, er, tag + " rstd")
    assert y.stride() == x.stride()
    dx, dw, db = gn_bwd(lib, dy, x, w, b, mean, rstd, G, act, slope)
    tdx, tdw, tdb = R.group_norm_bwd(dy.double(), x.double(), _d(w), _d(b), tm, tr, G, act, slope)
    edx, edw, edb = R.group_norm_bwd(dy, x, w, b, em, er, G, act, slope)
    check(dx, tdx, edx, tag + " dx")
    if w is not None:
        check(dw, tdw, edw, tag + " dweight")
    if b is not None:
        check(db, tdb, edb, tag + " dbias")
    return (y, mean, rstd, dx, dw, db)


@pytest.mark.parametrize("shape,G", GN_SHAPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_group_norm_shapes(lib, shape, G, cl):
    _gn_case(lib, shape, G, torch.float32, cl, "silu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_group_norm_dtypes(lib, dtype, cl):
    _gn_case(lib, (2, 8, 24), 4, dtype, cl, "leaky_relu", -0.1)
    if dtype in (torch.float16, torch.bfloat16):
        _gn_case(lib, (2, 8, 13), 2, dtype, cl, "relu", wdtype=torch.float32)


@pytest.mark.parametrize("act,slope", [("none", 0.0), ("relu", 0.0), ("leaky_relu", 0.2), ("silu", 0.0)])
@pytest.mark.parametrize("affine", [(True, True), (False, False), (False, True)], ids=["wb", "none", "b"])
def test_group_norm_activations_affine(lib, act, slope, affine):
    _gn_case(lib, (2, 6, 20), 3, torch.float32, False, act, slope, affine=affine)
    _gn_case(lib, (2, 6, 20), 3, torch.float32, True, act, slope, affine=affine)


# ============================================================================= BatchNorm
BN_SHAPES = [(4, 6, 35), (2, 3, 64), (33, 16, 1), (1, 5, 7), (3, 1, 100), (8, 40, 9), (2, 24, 300)]


def _bn_case(lib, shape, dtype, cl, act, slope=0.01, wdtype=None, affine=(True, True), training=True, offset=0.5):
    x, dy, w, b = make(shape, dtype, cl, wdtype, affine, offset)
    tag = f"bn {shape} {dtype} cl={cl} act={act}"
    acc = _acc(dtype)
    stats = bn_stats(lib, x)
    ts, es = R.batch_norm_stats(x.double()), R.batch_norm_stats(x)
    check(stats, ts, es, tag + " stats")
    mean, rstd = ts[1].to(acc), torch.rsqrt(ts[2] / ts[0] + 1e-5).to(acc)  # the same statistics for all
    y = bn_step(lib, 0, None, x, w, b, mean, rstd, None, act, slope)
    check(y, R.batch_norm_elemt(x.double(), _d(w), _d(b), mean.double(), rstd.double(), act, slope),
          R.batch_norm_elemt(x, w, b, mean, rstd, act, slope), tag + " y")
    assert y.stride() == x.stride()
    sums = bn_step(lib, 1, dy, x, w, b, mean, rstd, None, act, slope)
    tsums = R.batch_norm_bwd_reduce(dy.double(), x.double(), _d(w), _d(b), mean.double(), rstd.double(), act, slope)
    check(sums, tsums, R.batch_norm_bwd_reduce(dy, x, w, b, mean, rstd, act, slope), tag + " sums")
    coef = (tsums / ts[0]).to(acc) if training else None
    dx = bn_step(lib, 2, dy, x, w, b, mean, rstd, coef, act, slope)
    check(dx, R.batch_norm_bwd_elemt(dy.double(), x.double(), _d(w), _d(b), mean.double(), rstd.double(),
                                     _d(coef), act, slope),
          R.batch_norm_bwd_elemt(dy, x, w, b, mean, rstd, coef, act, slope), tag + " dx")
    return stats, y, sums, dx


@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_batch_norm_shapes(lib, shape, cl):
    _bn_case(lib, shape, torch.float32, cl, "silu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_batch_norm_dtypes(lib, dtype, cl):
    _bn_case(lib, (3, 16, 20), dtype, cl, "leaky_relu", -0.1)
    if dtype in (torch.float16, torch.bfloat16):
        _bn_case(lib, (3, 9, 7), dtype, cl, "relu", wdtype=torch.float32)


@pytest.mark.parametrize("act,slope", [("none", 0.0), ("relu", 0.0), ("silu", 0.0)])
@pytest.mark.parametrize("affine", [(True, True), (False, False)], ids=["wb", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_activations_affine_eval(lib, act, slope, affine, training):
    for cl in (False, True):
        _bn_case(lib, (3, 5, 12), torch.float32, cl, act, slope, affine=affine, training=training)


# ============================================================================= plans, precision, determinism
@pytest.mark.parametrize("sms", [1, 5, 64])
def test_splits(lib, sms):
    """The SM count the plans see sets the splits (J): one block per output up to more blocks than
    tiles; the results stay within rounding of each other."""
    lib.emu_set_sms(sms)
    try:
        for cl in (False, True):
            _gn_case(lib, (1, 8, 2000), 2, torch.float32, cl, "silu")
            _bn_case(lib, (5, 3, 700), torch.float32, cl, "relu")
    finally:
        lib.emu_set_sms(2)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_large_offset_keeps_precision(lib, cl):
    """fp32 values of mean 1e4 and std 2: statistics to fp32 precision (the per-thread pivots and the
    float64 combines), over several splits."""
    lib.emu_set_sms(8)
    try:
        x, _, _, _ = make((2, 8, 900), torch.float32, cl, offset=1e4)
        _, mean, rstd = gn_fwd(lib, x, None, None, 2)
        xg = x.double().reshape(2, 2, -1)
        torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-7, atol=0)
        torch.testing.assert_close(rstd.double(), torch.rsqrt(xg.var(-1, unbiased=False) + 1e-5), rtol=1e-6, atol=0)
        stats = bn_stats(lib, x).double()
        xc = x.double().transpose(0, 1).reshape(8, -1)
        torch.testing.assert_close(stats[1], xc.mean(1), rtol=1e-7, atol=0)
        torch.testing.assert_close(stats[2] / stats[0], xc.var(1, unbiased=False), rtol=1e-6, atol=0)
    finally:
        lib.emu_set_sms(2)


def test_deterministic(lib):
    lib.emu_set_sms(4)
    try:
        for cl in (False, True):
            a = _gn_case(lib, (2, 8, 500), 4, torch.float32, cl, "silu")
            b = _gn_case(lib, (2, 8, 500), 4, torch.float32, cl, "silu")
            c = _bn_case(lib, (4, 8, 300), torch.float32, cl, "silu")
            d = _bn_case(lib, (4, 8, 300), torch.float32, cl, "silu")
            for u, v in zip(a + c, b + d):
                assert torch.equal(u, v)
    finally:
        lib.emu_set_sms(2)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_misaligned_base(lib, cl):
    """A storage offset of one element: element-wise loads, the same numbers."""
    x, dy, w, b = make((2, 8, 24), torch.float16, cl)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    xs = buf[1:].as_strided(x.shape, x.stride())
    xs.copy_(x)
    a, c = gn_fwd(lib, x, w, b, 4, "silu"), gn_fwd(lib, xs, w, b, 4, "silu")
    for u, v in zip(a, c):
        assert torch.equal(u, v)
    assert torch.equal(bn_stats(lib, x), bn_stats(lib, xs))


def test_nan_propagates(lib):
    for cl in (False, True):
        x, dy, w, b = make((2, 4, 10), torch.float32, cl)
        x[0, 1, 3] = float("nan")
        y, mean, rstd = gn_fwd(lib, x, w, b, 2)
        assert torch.isnan(y[0, :2]).all() and not torch.isnan(y[0, 2:]).any() and not torch.isnan(y[1]).any()
        stats = bn_stats(lib, x)
        assert torch.isnan(stats[1:, 1]).all() and not torch.isnan(stats[:, [0, 2, 3]]).any()


def test_divmod_int64(lib):
    """The kernels' index division: 32-bit where both fit, else an fp64 estimate corrected both ways."""
    g = torch.Generator().manual_seed(0)
    pairs = [(7, 3), (2**32 + 5, 3), (2**31 * 3, 2**31), (12, 2**33), (2**52 - 1, 2**33 + 1)]
    for _ in range(3000):
        b = int(torch.randint(1, 2**40, (1,), generator=g)) >> int(torch.randint(0, 40, (1,), generator=g))
        k = int(torch.randint(0, 2**52 // max(b, 1), (1,), generator=g)) if b < 2**52 else 0
        for a in (k * max(b, 1), k * max(b, 1) + max(b, 1) - 1, k * max(b, 1) + 1):
            if a >= 2**32 or b >= 2**32:
                pairs.append((a, max(b, 1)))
    q, r = ctypes.c_int64(), ctypes.c_int64()
    for a, b in pairs:
        lib.emu_divmod(a, b, ctypes.byref(q), ctypes.byref(r))
        assert (q.value, r.value) == divmod(a, b), (a, b)

"""The ops behind adaptive clipping and telemetry, on every backend that has them.

``fusedstab::grad_stats``: each tensor's sum of squares, non-finite count and max |x| against a
float64 truth computed from the very same values (fp32/fp16/fp64 on CPU, bf16 too on a GPU), over
sizes that straddle the chunks of the Triton (16384) and C++ (65536) kernels, layouts the kernels
serve (dense) and the others (strided slices, complex: the reference inside the same call), NaN/Inf.

``fusedstab::grad_clip_finish``: every mode against the plain-Python reimplementation in
tests/clip_model.py over random norm sequences with spikes, NaN, Inf and a hard ceiling; the
telemetry ring slots; the argument checks.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import fusedstab
from fusedstab import backend as fs_backend
from fusedstab.reference import WINDOW

from clip_model import PyClipper

OPS = torch.ops.fusedstab
BACKENDS = [b for b in fs_backend.BACKENDS if b in fs_backend._impls["grad_stats"]]
INF, NAN = math.inf, math.nan


@pytest.fixture
def backend(request):
    with fusedstab.use_backend(request.param):
        yield request.param


def _truth(tensors):
    """(3, T) float64: sum |x|^2, non-finite count, max |x| (NaN if any NaN) of the values as stored."""
    rows = []
    for t in tensors:
        a = (t.abs() if t.is_complex() else t).double().abs().reshape(-1)
        mx = a.max().item() if a.numel() else 0.0
        rows.append([a.square().sum().item(), (~torch.isfinite(a)).sum().item(), mx])
    return torch.tensor(rows, dtype=torch.float64).T


def _lists(device, dtype):
    """Named tensor lists: sizes around both kernels' chunk sizes, every layout kind, NaN/Inf."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    sizes = [0, 1, 7, 1023, 1025, 16383, 16385] + ([65537] if fusedstab.get_backend() == "cpu" else [])
    yield "sizes", [r(n) for n in sizes]  # chunks: Triton 16384 elements, C++ 65536
    bad = [r(5000), r(20000), r(3, 7), r(16385)]
    bad[0][17] = NAN
    bad[1][-1] = INF
    bad[1][3] = -INF
    bad[2][1, 2] = NAN
    bad[2][0, 0] = INF
    yield "nonfinite", bad
    yield "layouts", [r(6, 10).t(), r(4, 3, 5, 2).contiguous(memory_format=torch.channels_last),
                      r(12, 8)[:, ::2], r(50)[3:], torch.zeros(9, device=device, dtype=dtype)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in (torch.float32, torch.float16, torch.float64)] + [
    pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.gpu)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)])
def test_grad_stats_values(backend, device, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, ts in _lists(device, dtype):
        got = OPS.grad_stats(ts)
        assert got.shape == (3, len(ts)) and got.dtype == acc and got.device.type == device, name
        want = _truth(ts)
        got = got.double().cpu()
        # exact: counts (below 2^24) and max |x| (a stored value, exact in the accumulation dtype)
        assert torch.equal(got[1], want[1]), f"{name}: non-finite counts {got[1]} != {want[1]}"
        assert torch.equal(got[2].nan_to_num(-1.0), want[2].nan_to_num(-1.0)), f"{name}: max |x| {got[2]} != {want[2]}"
        rtol = 1e-12 if dtype == torch.float64 else 2e-6  # an fp32 sum of up to 65537 squares, blocked
        torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=0.0, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_grad_stats_complex_and_empty_list(backend):
    """Complex tensors take the reference inside the same call (|x| of each element)."""
    z = torch.randn(10, dtype=torch.complex64)
    z[3] = complex(NAN, 0.0)
    got = OPS.grad_stats([z, torch.randn(4, dtype=torch.complex64)])
    assert got.dtype == torch.float32
    want = _truth([z, torch.randn(4, dtype=torch.complex64)])
    assert got[1, 0].item() == 1 and math.isnan(got[2, 0].item()) and math.isnan(got[0, 0].item())
    assert want[1, 0].item() == 1
    with pytest.raises(ValueError, match="non-empty"):
        OPS.grad_stats([])


# ----------------------------------------------------------------------------- the finishing program
def _sequence(rng: random.Random, n: int, nonfinite: bool = True) -> list[float]:
    """Norms drifting around 1 over decades, with spikes (x5..x200), NaN and +Inf."""
    out, level = [], 1.0
    for _ in range(n):
        level *= math.exp(rng.gauss(0, 0.05))
        r = rng.random()
        if nonfinite and r < 0.04:
            out.append(NAN)
        elif nonfinite and r < 0.06:
            out.append(INF)
        elif r < 0.14:
            out.append(level * rng.uniform(5, 200))
        else:
            out.append(level * math.exp(rng.gauss(0, 0.3)))
    return out


def _stats_of(g: float, T: int, rows: int, rng: random.Random) -> torch.Tensor:
    """(rows, T) stats whose first row sums to g^2 (split unevenly; NaN/Inf put in one tensor)."""
    w = [rng.random() + 0.01 for _ in range(T)]
    sq = [g * g * x / sum(w) for x in w] if math.isfinite(g) else [1.0] * (T - 1) + [g]
    st = torch.zeros(rows, T, dtype=torch.float64)
    st[0] = torch.tensor(sq, dtype=torch.float64)
    if rows == 3:
        st[1, -1] = 0.0 if math.isfinite(g) else 3.0
        st[2] = st[0].sqrt() / 2
    return st


def _run_finish(mode, norms, cfg, T=5, K=4, rows=3, cap=INF, cap_tensor=False, seed=0):
    """Feed ``norms`` through grad_clip_finish and the Python model; returns both step records."""
    rng = random.Random(seed)
    W = cfg.get("window", 16) if mode == "quantile" else 0
    state = torch.zeros(WINDOW + W, dtype=torch.float64)
    state[WINDOW:] = NAN
    rt = torch.zeros(K, 3, T) if rows == 3 else torch.zeros(0, 3, T)
    rs = torch.zeros(K, 5, dtype=torch.float64)
    model = PyClipper(mode, cap=cap, warmup=cfg.get("warmup", 5), z_thresh=cfg.get("z_thresh", 2.5),
                      alpha=cfg.get("alpha", 0.9), eps=1e-6, q=cfg.get("q", 0.9), window=max(W, 1),
                      skip_nonfinite=cfg.get("skip_nonfinite", True), skip_above=cfg.get("skip_above", INF))
    got, want = [], []
    for step, g in enumerate(norms):
        st = _stats_of(g, T, rows, rng).to(cfg.get("dtype", torch.float64))
        mn = torch.tensor(cap, dtype=torch.float32) if cap_tensor else None
        total, coef, found, thr = OPS.grad_clip_finish(
            st, state, mn, cap, mode, cfg.get("warmup", 5), cfg.get("z_thresh", 2.5), cfg.get("alpha", 0.9), 1e-6,
            cfg.get("q", 0.9), cfg.get("skip_nonfinite", True), cfg.get("skip_above", INF), rt, rs)
        g_dev = total.double().item()
        w_thr, w_coef, w_skip = model.step(g_dev)  # the model takes the device's norm: no rounding gap
        got.append((g_dev, thr.double().item(), coef.double().item(), found.item()))
        want.append((g_dev, w_thr, w_coef, float(w_skip)))
        if rows == 3 and K:
            slot = step % K
            assert rs[slot, 0].item() == step + 1
            torch.testing.assert_close(rs[slot, 1:].tolist(), [g_dev, got[-1][1], got[-1][2], got[-1][3]],
                                       equal_nan=True)
            torch.testing.assert_close(rt[slot, 0].double(), st[0].double().sqrt().float().double(), equal_nan=True)
            assert torch.equal(rt[slot, 2], st[1].float()), "non-finite counts in the ring"
    return got, want, state, model


def _compare(got, want, what, rel=1e-9):
    for step, (a, b) in enumerate(zip(got, want)):
        assert a[3] == b[3], f"{what} step {step}: skipped {a[3]} != model's {b[3]} (norm {a[0]})"
        for k, name in ((1, "threshold"), (2, "coef")):
            if math.isnan(b[k]):
                assert math.isnan(a[k]), f"{what} step {step}: {name} {a[k]}, model NaN"
            else:
                assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-300), \
                    f"{what} step {step} (norm {a[0]}): {name} {a[k]} != model's {b[k]}"


CONFIGS = {
    "fixed": [dict(), dict(skip_above=30.0), dict(skip_nonfinite=False)],
    "zclip": [dict(), dict(warmup=1, z_thresh=1.0, alpha=0.5), dict(warmup=12, z_thresh=3.0, alpha=0.99),
              dict(skip_above=50.0, skip_nonfinite=False)],
    "quantile": [dict(), dict(warmup=0, q=0.5, window=1), dict(warmup=3, q=1.0, window=7),
                 dict(warmup=20, q=0.0, window=40, skip_above=80.0)],
}
_CASES = [(m, i) for m, cs in CONFIGS.items() for i in range(len(cs))]


# Under the Triton interpreter a finishing call costs ~0.1 s: a subset of the configurations, shorter.
_INTERPRETED = {("fixed", 1), ("zclip", 0), ("zclip", 1), ("quantile", 1), ("quantile", 2)}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode,ci", _CASES, ids=[f"{m}{i}" for m, i in _CASES])
def test_finish_matches_python_model(backend, mode, ci):
    cfg = CONFIGS[mode][ci]
    interpreted = backend == "triton" and _interpreter()
    if interpreted and (mode, ci) not in _INTERPRETED:
        pytest.skip("Triton interpreter: a subset of the configurations (every one runs on the other backends)")
    rng = random.Random(100 + ci)
    caps = [(INF, False), (4.0, True)]
    for seed, (cap, cap_tensor) in enumerate(caps[ci % 2:][:1] if interpreted else caps):
        norms = _sequence(rng, 30 if interpreted else 60)
        got, want, state, model = _run_finish(mode, norms, cfg, cap=cap, cap_tensor=cap_tensor, seed=seed)
        _compare(got, want, f"{mode} {cfg} cap={cap}")
        if mode == "zclip" and model.n >= model.warmup:
            assert state[2].item() == pytest.approx(model.mean, rel=1e-9)
            assert state[3].item() == pytest.approx(model.var, rel=1e-9, abs=1e-300)
        assert state[1].item() == model.n


def _interpreter() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_finish_fp32_stats_one_row_no_ring(backend):
    """stats of multi_tensor_norm (one row, fp32) and no telemetry ring."""
    norms = _sequence(random.Random(5), 40)
    got, want, _, _ = _run_finish("zclip", norms, dict(dtype=torch.float32), rows=1, K=0)
    _compare(got, want, "zclip fp32 one row", rel=1e-6)  # outputs rounded to fp32


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_finish_ring_wraps_and_empty_list(backend):
    got, _, _, _ = _run_finish("fixed", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], {}, K=3, cap=2.5)
    st = torch.zeros(WINDOW, dtype=torch.float64)
    rs = torch.zeros(2, 5, dtype=torch.float64)
    total, coef, found, thr = OPS.grad_clip_finish(torch.zeros(3, 0), st, None, 1.0, "fixed", 0, 2.5, 0.9, 1e-6, 0.9,
                                                   True, INF, torch.zeros(2, 3, 0), rs)
    assert (total.item(), coef.item(), found.item(), thr.item()) == (0.0, 1.0, 0.0, 1.0)
    assert rs[0].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_finish_argument_errors():
    st, rs, rt = torch.zeros(4, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 3, 3)
    call = lambda stats=torch.ones(3, 3), state=st, mode="fixed", rt=rt, rs=rs: OPS.grad_clip_finish(
        stats, state, None, 1.0, mode, 0, 2.5, 0.9, 1e-6, 0.9, True, INF, rt, rs)
    for kw, match in [(dict(mode="median"), "mode"), (dict(stats=torch.ones(2, 3)), "stats"),
                      (dict(state=torch.zeros(4)), "state"), (dict(mode="quantile"), "state"),
                      (dict(rt=torch.zeros(2, 3, 4)), "ring_tensors"), (dict(rs=torch.zeros(2, 4)), "ring_scalars"),
                      (dict(stats=torch.ones(1, 3)), "ring_tensors")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)

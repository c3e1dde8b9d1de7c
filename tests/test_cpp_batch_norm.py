"""The C++ CPU BatchNorm kernels called directly (``torch.ops.fusedstab_C.batch_norm_stats / _elemt /
_bwd_reduce / _bwd_elemt``): what the op tests through the public ops cannot reach.

- Parity: every dtype (bf16 included: no interpreter here), both dense layouts (NCHW and
  channels-inner, (N, C) input as (N, C, 1)), every activation, odd sizes, weight/bias None or fp32 with
  fp16/bf16 input, training and eval, against a float64 truth and eager torch by the per-dtype rule in
  ``helpers``.
- Numerics: a 1e4 offset, constant channels, NaN/Inf as torch, bitwise determinism run to run and
  across thread counts.
- Checks: every argument of the wrong dtype, sizes, strides or device raises a clear error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedstab import reference
from helpers import assert_matches

EPS = 1e-5
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ACTS = [("none", 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.1), ("silu", 0.01)]


@pytest.fixture(scope="module")
def ops(C):  # conftest's C: skipped or failed where the extension is unavailable
    return C


def make_x(shape, dtype, cl=False, scale=2.0, offset=0.5):
    N, C, S = shape
    x = torch.randn(N, S, C).transpose(1, 2) if cl else torch.randn(shape)
    return (x * scale + offset).to(dtype)


def fs_bn(ops, x, w, b, act, slope, dy, training=True, rm=None, rv=None):
    """The four steps as the public ops chain them: (stats, y, dx, dweight, dbias); eval uses rm / rv."""
    acc = reference.acc_dtype(x.dtype)
    stats = x.new_empty((3, x.shape[1]), dtype=acc)
    ops.batch_norm_stats(x, stats)
    count, mean, m2 = stats
    if training:
        rstd = torch.rsqrt(m2 / count + EPS)
    else:
        mean, rstd = rm.to(acc), torch.rsqrt(rv.to(acc) + EPS)
    y = torch.empty_like(x)
    ops.batch_norm_elemt(x, w, b, mean, rstd, act, slope, y)
    sums = torch.empty_like(stats[:2])
    ops.batch_norm_bwd_reduce(dy, x, w, b, mean, rstd, act, slope, sums)
    dx = torch.empty_like(x)
    ops.batch_norm_bwd_elemt(dy, x, w, b, mean, rstd, sums / count if training else None, act, slope, dx)
    return stats, y, dx, sums[1], sums[0]


def eager(x, w, b, act, slope, dy, training=True, rm=None, rv=None):
    """Eager torch (F.batch_norm, the activation, autograd) on x's dtype (weights promoted with it)."""
    ups = x.dtype if w is None else torch.promote_types(x.dtype, w.dtype)
    xl, wl, bl = (None if t is None else t.detach().to(ups).requires_grad_() for t in (x, w, b))
    rm, rv = (None if t is None else t.to(ups) for t in (rm, rv))
    y = reference.activate(F.batch_norm(xl, rm, rv, wl, bl, training, 0.1, EPS), act, slope)
    y.backward(dy.to(ups))
    return (y.detach().to(x.dtype), xl.grad.to(x.dtype), None if wl is None else wl.grad, None if bl is None else bl.grad)


def check_parity(ops, x, w, b, act, slope, tag, training=True):
    N, C, S = x.shape
    rm, rv = 0.3 * torch.randn(C), 0.5 + torch.rand(C)
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    stats, y, dx, dw, db = fs_bn(ops, x, w, b, act, slope, dy, training, rm, rv)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = eager(x.double(), d64(w), d64(b), act, slope, dy.double(), training, d64(rm), d64(rv))
    ref = eager(x, w, b, act, slope, dy, training, rm, rv)
    assert y.stride() == x.stride() and dx.stride() == x.stride(), tag
    xc = x.double().transpose(0, 1).reshape(C, -1)
    mean64, var64 = xc.mean(1), xc.var(1, unbiased=False)
    assert torch.equal(stats[0].double(), torch.full((C,), float(N * S), dtype=torch.float64)), tag
    assert_matches(stats[1], mean64, mean64.to(stats.dtype), f"{tag} mean", scale=max(1.0, xc.abs().max().item()))
    assert_matches(stats[2] / (N * S), var64, var64.to(stats.dtype), f"{tag} M2 / count")
    m, r = (mean64, torch.rsqrt(var64 + EPS)) if training else (rm.double(), torch.rsqrt(rv.double() + EPS))
    xhat = (x.double() - m[:, None]) * r[:, None]
    wd = torch.ones(C, dtype=torch.float64) if w is None else w.double()
    gabs = dy.double().abs() * 1.1  # |act'| <= 1.1 (silu)
    sdx = (r.max() * (gabs * wd.abs()[:, None]).max() * (2 + xhat.abs().max())).item()
    assert_matches(y, truth[0], ref[0], f"{tag} y", scale=max(1.0, (xhat.abs() * wd.abs()[:, None]).max().item() + 1))
    assert_matches(dx, truth[1], ref[1], f"{tag} dx", scale=sdx)
    if w is not None:
        assert_matches(dw, truth[2], ref[2].to(dw.dtype), f"{tag} dweight", scale=(gabs * xhat.abs()).sum((0, 2)).clamp(min=1))
    if b is not None:
        assert_matches(db, truth[3], ref[3].to(db.dtype), f"{tag} dbias", scale=gabs.sum((0, 2)).clamp(min=1))


# (N, C, S): odd sizes, (N, C) input as S = 1, one sample, long runs, many chunks per channel
SHAPES = [(2, 6, 5), (7, 3, 1), (300, 5, 1), (1, 8, 9), (5, 12, 37), (2, 33, 7), (1, 4, 5003), (4, 64, 197),
          (3, 2, 3000), (1000, 13, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
def test_parity(ops, dtype, cl):
    for i, shape in enumerate(SHAPES):
        for act, slope in (ACTS[i % len(ACTS)], ACTS[(i + 2) % len(ACTS)]):  # each activation 4 times
            x = make_x(shape, dtype, cl)
            C = shape[1]
            w, b = (1 + 0.5 * torch.randn(C)).to(dtype), (0.5 * torch.randn(C)).to(dtype)
            check_parity(ops, x, w, b, act, slope, f"{shape} {'cl' if cl else 'nchw'} {act}({slope})")


@pytest.mark.parametrize("affine", ("none", "weight", "bias", "fp32-params"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("mode", ("train", "eval"))
def test_optional_params_and_eval(ops, affine, dtype, mode):
    """weight/bias None, or fp32 with 16-bit input; eval (running statistics, coef None)."""
    pdt = torch.float32 if affine == "fp32-params" else dtype
    for cl in (False, True):
        x = make_x((6, 12, 29), dtype, cl)
        w = None if affine in ("none", "bias") else (1 + 0.5 * torch.randn(12)).to(pdt)
        b = None if affine in ("none", "weight") else (0.5 * torch.randn(12)).to(pdt)
        check_parity(ops, x, w, b, "silu", 0.01, f"{affine} {dtype} cl={cl} {mode}", training=mode == "train")


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
def test_large_offset(ops, cl):
    """fp32 channels of mean 1e4, std 1, over many chunks: mean and M2 keep fp32 precision (as good as the
    triton path's float64 combine)."""
    x = make_x((8, 4, 3000), torch.float32, cl, scale=1.0, offset=1e4)
    stats = torch.empty(3, 4)
    ops.batch_norm_stats(x, stats)
    xc = x.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(stats[1].double(), xc.mean(1), rtol=1e-7, atol=0)
    torch.testing.assert_close(stats[2].double() / xc.shape[1], xc.var(1, unbiased=False), rtol=2e-6, atol=0)


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
def test_constant_channels(ops, cl):
    """Channels of one value (2, -0.5, 0, 0.1, 1e4): mean exact, M2 0, y = act(bias) exactly."""
    x = make_x((5, 6, 30), torch.float32, cl)
    for c, v in enumerate((2.0, -0.5, 0.0, 0.1, 1e4)):
        x[:, c] = v
    stats = torch.empty(3, 6)
    ops.batch_norm_stats(x, stats)
    assert torch.equal(stats[1, :5], x[0, :5, 0]) and (stats[2, :5] == 0).all()
    rstd = torch.rsqrt(stats[2] / stats[0] + EPS)
    b = 0.5 * torch.randn(6)
    for act, slope in ACTS:
        y = torch.empty_like(x)
        ops.batch_norm_elemt(x, torch.randn(6), b, stats[1], rstd, act, slope, y)
        tol = dict(rtol=0, atol=0) if act != "silu" else dict(rtol=4e-6, atol=0)  # SiLU: exp within 20 ulp
        torch.testing.assert_close(y[:, :5], reference.activate(b[:5], act, slope)[None, :, None].expand(5, 5, 30),
                                   **tol, msg=act)


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("act,slope", [("none", 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("silu", 0.01)])
@pytest.mark.parametrize("mode", ("train", "eval"))
def test_nan_inf_like_torch(ops, cl, act, slope, mode):
    """NaN / +-Inf in a channel: torch's NaN/Inf pattern in the batch mean, y, dx, dweight, dbias (training:
    the whole channel; eval: the element, an infinite x giving a finite dx); other channels as torch."""
    x = make_x((3, 6, 20), torch.float32, cl)
    x[0, 0, 3], x[1, 2, 0], x[2, 4, 1], x[0, 4, 7] = float("nan"), float("inf"), float("inf"), float("-inf")
    w, b = 1 + 0.5 * torch.randn(6), 0.5 * torch.randn(6)
    rm, rv = 0.3 * torch.randn(6), 0.5 + torch.rand(6)
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    training = mode == "train"
    stats, *got = fs_bn(ops, x, w, b, act, slope, dy, training, rm, rv)
    exp = eager(x, w, b, act, slope, dy, training, rm, rv)
    mean = x.transpose(0, 1).reshape(6, -1).mean(1)
    assert torch.equal(torch.isfinite(stats[1]), torch.isfinite(mean)), "batch mean"
    for g, e, name in zip(got, exp, ("y", "dx", "dweight", "dbias")):
        assert torch.equal(torch.isnan(g), torch.isnan(e)), name
        assert torch.equal(torch.isinf(g), torch.isinf(e)), name
        fin = torch.isfinite(e)
        torch.testing.assert_close(g[fin], e[fin], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
def test_deterministic_any_thread_count(ops, cl):
    """Bitwise the same stats, sums and outputs run to run and with 1 or 2 threads."""
    x = make_x((16, 5, 900), torch.float32, cl)
    w, b = 1 + 0.5 * torch.randn(5), 0.5 * torch.randn(5)
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    threads, out = torch.get_num_threads(), []
    try:
        for nt in (1, 2, 2):
            torch.set_num_threads(nt)
            out.append(fs_bn(ops, x, w, b, "silu", 0.01, dy))
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for a, c in zip(out[0], other):
            assert torch.equal(a, c)


def test_empty(ops):
    x = torch.randn(0, 4, 3)
    stats, sums = torch.ones(3, 4), torch.ones(2, 4)
    ops.batch_norm_stats(x, stats)
    ops.batch_norm_bwd_reduce(x, x, None, None, torch.zeros(4), torch.ones(4), "relu", 0.01, sums)
    assert (stats == 0).all() and (sums == 0).all()


# ----------------------------------------------------------------------------- argument checks
def _other_layout(t):
    return t.contiguous() if not t.is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def _valid(cl):
    x = make_x((2, 6, 5), torch.float32, cl)
    return dict(x=x, dy=torch.empty_like(x).normal_(), weight=torch.randn(6), bias=torch.randn(6), mean=torch.randn(6),
                rstd=torch.rand(6) + 0.5, coef=torch.randn(2, 6), act="relu", stats=torch.empty(3, 6),
                y=torch.empty_like(x), sums=torch.empty(2, 6), dx=torch.empty_like(x))


CALLS = {
    "stats": lambda o, a: o.batch_norm_stats(a["x"], a["stats"]),
    "elemt": lambda o, a: o.batch_norm_elemt(a["x"], a["weight"], a["bias"], a["mean"], a["rstd"], a["act"], 0.1,
                                             a["y"]),
    "bwd_reduce": lambda o, a: o.batch_norm_bwd_reduce(a["dy"], a["x"], a["weight"], a["bias"], a["mean"], a["rstd"],
                                                       a["act"], 0.1, a["sums"]),
    "bwd_elemt": lambda o, a: o.batch_norm_bwd_elemt(a["dy"], a["x"], a["weight"], a["bias"], a["mean"], a["rstd"],
                                                     a["coef"], a["act"], 0.1, a["dx"]),
}
_X = [("x", lambda t: t.int(), "x must be float32"), ("x", lambda t: t[0], "3-d"),
      ("x", lambda t: torch.randn(2, 6, 10)[:, :, ::2], "dense NCHW"), ("x", lambda t: t.to("meta"), None)]
_PARAMS = [("weight", lambda t: t[:5], "weight must have sizes"), ("weight", lambda t: t.int(), "weight must be a float"),
           ("bias", lambda t: torch.randn(12)[::2], "bias must be contiguous"),
           ("mean", lambda t: t.double(), "mean must be Float"), ("mean", lambda t: t[:4], "mean must have sizes"),
           ("rstd", lambda t: t[None], "rstd must have sizes"), ("act", lambda a: "tanh", "unknown activation")]
_DY = [("dy", lambda t: t.double(), "dy must have x's dtype"), ("dy", _other_layout, "dy must have x's strides"),
       ("dy", lambda t: t[:, :3], "dy must have x's sizes")]
BAD = {
    "stats": _X + [("stats", lambda t: t[:2], "stats must have sizes"), ("stats", lambda t: t.double(), "must be Float"),
                   ("stats", lambda t: torch.empty(6, 3).t(), "stats must be contiguous")],
    "elemt": _X + _PARAMS + [("y", lambda t: t.half(), "y must have x's dtype"),
                             ("y", _other_layout, "y must have x's strides")],
    "bwd_reduce": _X + _PARAMS + _DY + [("sums", lambda t: t[:1], "sums must have sizes")],
    "bwd_elemt": _X + _PARAMS + _DY + [("coef", lambda t: t[:, :5], "coef must have sizes"),
                                       ("coef", lambda t: t.double(), "coef must be Float"),
                                       ("dx", lambda t: t[:1], "dx must have x's sizes")],
}


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("op", tuple(CALLS))
def test_bad_arguments_raise(ops, op, cl):
    CALLS[op](ops, _valid(cl))  # the valid call runs
    for name, bad, msg in BAD[op]:
        a = _valid(cl)
        a[name] = bad(a[name])
        with pytest.raises((RuntimeError, NotImplementedError), match=msg):
            CALLS[op](ops, a)

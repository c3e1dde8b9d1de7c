"""The C++ CPU GroupNorm kernels called directly (``torch.ops.fusedstab_C.group_norm_fwd / _bwd``): what
the op tests through the public ops cannot reach.

- Parity: every dtype (bf16 included: no interpreter here), both dense layouts (NCHW and
  channels-inner), every activation, odd sizes, weight/bias None or of another float dtype, against a
  float64 truth (``fusedstab.reference``) and eager torch by the per-dtype rule in ``helpers``.
- Numerics: groups at an offset of 1e4, constant groups, NaN/Inf as torch, bitwise determinism run to
  run and across thread counts (the chunking and the combine order depend on the shape only).
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


def _acc(dtype):
    return reference.acc_dtype(dtype)


def make_x(shape, dtype, cl=False, scale=2.0, offset=0.5):
    """x (N, C, S) dense NCHW, or channels-inner (strides (C*S, 1, C)) with ``cl``."""
    N, C, S = shape
    x = torch.randn(N, S, C).transpose(1, 2) if cl else torch.randn(shape)
    return (x * scale + offset).to(dtype)


def fwd(ops, x, w, b, G, act="none", slope=0.01):
    N = x.shape[0]
    y, mean = torch.empty_like(x), x.new_empty((N, G), dtype=_acc(x.dtype))
    rstd = torch.empty_like(mean)
    ops.group_norm_fwd(x, w, b, G, EPS, act, slope, y, mean, rstd)
    return y, mean, rstd


def bwd(ops, dy, x, w, b, mean, rstd, G, act="none", slope=0.01):
    acc, C = mean.dtype, x.shape[1]
    dx = torch.empty_like(x)
    dw = x.new_empty((C,) if w is not None else (0,), dtype=acc)
    db = x.new_empty((C,) if b is not None else (0,), dtype=acc)
    ops.group_norm_bwd(dy, x, w, b, mean, rstd, G, act, slope, dx, dw, db)
    return dx, dw, db


def eager(x, w, b, G, act, slope, dy):
    """Eager torch (F.group_norm, the activation, autograd) in x's dtype: (y, dx, dweight, dbias)."""
    N, C, S = x.shape
    ups = x.dtype if w is None else torch.promote_types(x.dtype, w.dtype)
    xl, wl, bl = (None if t is None else t.detach().to(ups).requires_grad_() for t in (x, w, b))
    wg = wl if wl is not None else torch.ones(C, dtype=ups)  # torch's backward needs a weight with a bias
    y = reference.activate(F.group_norm(xl, G, wg, bl, EPS), act, slope)
    y.backward(dy.to(ups))
    return (y.detach().to(x.dtype), xl.grad.to(x.dtype), None if wl is None else wl.grad, None if bl is None else bl.grad)


def check_parity(ops, x, w, b, G, act, slope, tag):
    N, C, S = x.shape
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    y, mean, rstd = fwd(ops, x, w, b, G, act, slope)
    dx, dw, db = bwd(ops, dy, x, w, b, mean, rstd, G, act, slope)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    t_y, t_dx, t_dw, t_db = eager(x.double(), d64(w), d64(b), G, act, slope, dy.double())
    e_y, e_dx, e_dw, e_db = eager(x, w, b, G, act, slope, dy)
    assert y.stride() == x.stride() and dx.stride() == x.stride(), tag
    # conditioning scales: dx is a difference of terms of size rstd * |w * dy|; dweight / dbias are
    # sums of |dz * xhat| and |dz|
    xg = x.double().reshape(N, G, -1)
    m64, r64 = xg.mean(-1), torch.rsqrt(xg.var(-1, unbiased=False) + EPS)
    xhat = ((xg - m64[..., None]) * r64[..., None]).reshape(N, C, S)
    wd = torch.ones(C, dtype=torch.float64) if w is None else w.double()
    gabs = dy.double().abs() * 1.1  # |act'| <= 1.1 (silu)
    sdx = (r64.max() * (gabs * wd.abs()[:, None]).max() * (2 + xhat.abs().max())).item()
    assert_matches(y, t_y, e_y, f"{tag} y")
    assert_matches(mean, m64, m64.to(mean.dtype), f"{tag} mean", scale=max(1.0, x.double().abs().max().item()))
    assert_matches(rstd, r64, r64.to(rstd.dtype), f"{tag} rstd")
    assert_matches(dx, t_dx, e_dx, f"{tag} dx", scale=sdx)
    if w is not None:
        assert_matches(dw, t_dw, e_dw.to(dw.dtype), f"{tag} dweight", scale=(gabs * xhat.abs()).sum((0, 2)).clamp(min=1))
    if b is not None:
        assert_matches(db, t_db, e_db.to(db.dtype), f"{tag} dbias", scale=gabs.sum((0, 2)).clamp(min=1))


# (shape (N, C, S), G): odd sizes, one element per group, prime and long spatial runs, many chunks
SHAPES = [((2, 6, 5), 3), ((1, 8, 1), 2), ((3, 5, 1), 5), ((5, 12, 37), 4), ((2, 33, 7), 11), ((1, 4, 5003), 1),
          ((2, 64, 197), 32), ((9, 16, 30), 2), ((1, 3, 2), 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
def test_parity(ops, dtype, cl):
    for i, (shape, G) in enumerate(SHAPES):
        for act, slope in (ACTS[i % len(ACTS)], ACTS[(i + 2) % len(ACTS)]):  # each activation 4 times
            x = make_x(shape, dtype, cl)
            C = shape[1]
            w, b = (1 + 0.5 * torch.randn(C)).to(dtype), (0.5 * torch.randn(C)).to(dtype)
            check_parity(ops, x, w, b, G, act, slope, f"{shape} G={G} {'cl' if cl else 'nchw'} {act}({slope})")


@pytest.mark.parametrize("affine", ("none", "weight", "bias", "fp32-params", "fp16-params"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_optional_and_mixed_params(ops, affine, dtype):
    """weight/bias None, or of another float dtype than x (any float for GroupNorm)."""
    pdt = {"fp32-params": torch.float32, "fp16-params": torch.float16}.get(affine, dtype)
    for cl in (False, True):
        x = make_x((3, 12, 29), dtype, cl)
        w = None if affine in ("none", "bias") else (1 + 0.5 * torch.randn(12)).to(pdt)
        b = None if affine in ("none", "weight") else (0.5 * torch.randn(12)).to(pdt)
        check_parity(ops, x, w, b, 4, "silu", 0.01, f"{affine} {dtype} cl={cl}")


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
def test_large_offset(ops, cl):
    """fp32 groups of mean 1e4, std 1, over many chunks: mean and rstd keep fp32 precision."""
    x = make_x((2, 16, 1600), torch.float32, cl, scale=1.0, offset=1e4)
    _, mean, rstd = fwd(ops, x, None, None, 2)
    xg = x.double().reshape(2, 2, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xg.var(-1, unbiased=False) + EPS), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
def test_constant_groups(ops, dtype, cl):
    """Groups of one repeated value (0, 3, 0.1, 1e4): mean exact, variance 0, y = act(bias) exactly,
    finite gradients."""
    x = make_x((4, 6, 40), torch.float32, cl)
    for n, v in enumerate((0.0, 3.0, 0.1, 1e4)):
        x[n, :2] = v
    x = x.to(dtype)
    b = (0.5 * torch.randn(6)).to(dtype)
    w = (1 + 0.5 * torch.randn(6)).to(dtype)
    for act, slope in ACTS:
        y, mean, rstd = fwd(ops, x, w, b, 3, act, slope)
        expect = reference.activate(b.float(), act, slope).to(dtype)[:2, None].expand(2, 40)
        for n in range(4):  # z = bias exactly; SiLU's fp32 exp is within 20 ulp (channel_norm.h)
            tol = dict(rtol=0, atol=0) if act != "silu" else dict(rtol=max(4e-6, torch.finfo(dtype).eps), atol=0)
            torch.testing.assert_close(y[n, :2], expect, **tol, msg=f"{act} group {n}")
            assert mean[n, 0].item() == x[n, 0, 0].float().item()
        dx, dw, db = bwd(ops, torch.randn_like(x), x, w, b, mean, rstd, 3, act, slope)
        assert all(torch.isfinite(t).all() for t in (dx, dw, db))


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("act,slope", [("none", 0.01), ("relu", 0.01), ("silu", 0.01)])
def test_nan_inf_like_torch(ops, cl, act, slope):
    """NaN / +-Inf in a group: torch's NaN/Inf pattern in y and dx (the whole group), the other groups
    unaffected."""
    x = make_x((3, 6, 20), torch.float32, cl)
    x[0, 1, 3], x[1, 2, 0], x[2, 4, 1], x[2, 5, 7] = float("nan"), float("inf"), float("inf"), float("-inf")
    w, b = 1 + 0.5 * torch.randn(6), 0.5 * torch.randn(6)
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    y, mean, rstd = fwd(ops, x, w, b, 3, act, slope)
    dx, _, _ = bwd(ops, dy, x, w, b, mean, rstd, 3, act, slope)
    e_y, e_dx, _, _ = eager(x, w, b, 3, act, slope, dy)
    assert torch.equal(torch.isfinite(mean), torch.isfinite(x.reshape(3, 3, -1).mean(-1))), "mean"
    for got, exp, name in ((y, e_y, "y"), (dx, e_dx, "dx")):
        assert torch.equal(torch.isnan(got), torch.isnan(exp)), name
        assert torch.equal(torch.isinf(got), torch.isinf(exp)), name
        fin = torch.isfinite(exp)
        torch.testing.assert_close(got[fin], exp[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("shape,G", [((1, 8, 9000), 2), ((6, 32, 300), 8)], ids=("few-groups", "many"))
def test_deterministic_any_thread_count(ops, cl, shape, G):
    """Bitwise the same results run to run and with 1 or 2 threads (fixed chunks, fixed combine order;
    1 and 2 threads also take different schedules in by_units)."""
    x = make_x(shape, torch.float32, cl)
    w, b = 1 + 0.5 * torch.randn(shape[1]), 0.5 * torch.randn(shape[1])
    dy = torch.empty_like(x).copy_(torch.randn(shape))
    threads, out = torch.get_num_threads(), []
    try:
        for nt in (1, 2, 2):
            torch.set_num_threads(nt)
            y, mean, rstd = fwd(ops, x, w, b, G, "silu", 0.01)
            out.append((y, mean, rstd, *bwd(ops, dy, x, w, b, mean, rstd, G, "silu", 0.01)))
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for a, c in zip(out[0], other):
            assert torch.equal(a, c)


def test_empty(ops):
    x = torch.randn(2, 4, 0)
    y, mean, rstd = fwd(ops, x, None, None, 2)
    assert (mean == 0).all() and rstd.isnan().all()
    dx, dw, db = bwd(ops, x, x, torch.ones(4), torch.ones(4), mean, rstd, 2)
    assert (dw == 0).all() and (db == 0).all()


# ----------------------------------------------------------------------------- argument checks
def _valid(cl=False):
    x = make_x((2, 6, 5), torch.float32, cl)
    w, b = torch.randn(6), torch.randn(6)
    y, mean, rstd = torch.empty_like(x), torch.empty(2, 3), torch.empty(2, 3)
    return dict(x=x, weight=w, bias=b, G=3, act="silu", y=y, mean=mean, rstd=rstd, dy=torch.empty_like(x).normal_(),
                dx=torch.empty_like(x), dweight=torch.empty(6), dbias=torch.empty(6))


def _call_fwd(ops, a):
    ops.group_norm_fwd(a["x"], a["weight"], a["bias"], a["G"], EPS, a["act"], 0.01, a["y"], a["mean"], a["rstd"])


def _call_bwd(ops, a):
    ops.group_norm_bwd(a["dy"], a["x"], a["weight"], a["bias"], a["mean"].normal_(), a["rstd"].uniform_(), a["G"],
                       a["act"], 0.01, a["dx"], a["dweight"], a["dbias"])


def _other_layout(t):
    return t.contiguous() if not t.is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


_BAD = [  # (argument, bad value from the valid one, message)
    ("x", lambda t: t.int(), "x must be float32"),
    ("x", lambda t: t[:, :, None], "3-d"),
    ("x", lambda t: torch.randn(2, 6, 10)[:, :, ::2], "dense NCHW"),
    ("x", lambda t: t.to("meta"), None),
    ("weight", lambda t: t[:5], "weight must have sizes"),
    ("weight", lambda t: t.int(), "weight must be a float"),
    ("weight", lambda t: torch.randn(12)[::2], "weight must be contiguous"),
    ("bias", lambda t: t[None], "bias must have sizes"),
    ("G", lambda g: 4, "num_groups"),
    ("G", lambda g: 0, "num_groups"),
    ("act", lambda a: "gelu", "unknown activation"),
    ("y", lambda t: t.double(), "y must have x's dtype"),
    ("y", lambda t: t[:, :5], "y must have x's sizes"),
    ("y", lambda t: _other_layout(t), "y must have x's strides"),
    ("mean", lambda t: t.double(), "mean must be Float"),
    ("mean", lambda t: t[:, :2], "mean must have sizes"),
    ("rstd", lambda t: torch.empty(3, 2).t(), "rstd must be contiguous"),
]
_BAD_BWD = _BAD[:11] + [
    ("dy", lambda t: t.half(), "dy must have x's dtype"),
    ("dy", lambda t: _other_layout(t), "dy must have x's strides"),
    ("dx", lambda t: t[:1], "dx must have x's sizes"),
    ("mean", lambda t: t.reshape(3, 2), "mean must have sizes"),
    ("rstd", lambda t: t.double(), "rstd must be Float"),
    ("dweight", lambda t: t[:5], "dweight must have sizes"),
    ("dweight", lambda t: t.double(), "dweight must be Float"),
    ("dbias", lambda t: t.half(), "dbias must be Float"),
]


@pytest.mark.parametrize("cl", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("which", ("fwd", "bwd"))
def test_bad_arguments_raise(ops, which, cl):
    call = _call_fwd if which == "fwd" else _call_bwd
    call(ops, _valid(cl))  # the valid call runs
    for name, bad, msg in (_BAD if which == "fwd" else _BAD_BWD):
        a = _valid(cl)
        a[name] = bad(a[name])
        with pytest.raises((RuntimeError, NotImplementedError), match=msg):
            call(ops, a)

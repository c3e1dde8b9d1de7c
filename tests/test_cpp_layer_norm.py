"""Direct calls of the C++ CPU LayerNorm / RMSNorm kernels (``torch.ops.fusedstab_C.layer_norm_fwd`` /
``layer_norm_bwd``): what the op tests, which go through the public ops, cannot reach.

- every argument the kernels assume something about is checked: a wrong dtype, shape, stride or
  device of any input or output raises a clear error instead of reading or writing out of bounds;
- a parity sweep against the float64 reference (``fusedstab.reference.norm_fwd`` / ``norm_bwd``) over
  dtypes, mixed residual / weight dtypes, row strides and odd sizes, with the per-dtype rule of
  ``helpers.assert_matches`` (fp16/bf16: at most 2x the error of the same formula evaluated by torch
  in the input dtype);
- hard rows (constant, zero, a large offset), NaN/Inf, bitwise determinism.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedstab import reference

from helpers import assert_matches

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EPS = 1e-5


def _acc(dt):
    return reference.acc_dtype(dt)


def fwd(C, x, w, b, r, rms, eps=EPS):
    M, N = x.shape
    hd = x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)
    y = torch.empty(M, N, dtype=x.dtype)
    h = torch.empty((M, N) if r is not None else (0,), dtype=hd)
    mean = torch.empty((0,) if rms else (M,), dtype=_acc(hd))
    rstd = torch.empty(M, dtype=_acc(hd))
    C.layer_norm_fwd(x, w, b, r, eps, rms, y, h, mean, rstd)
    return y, (h if r is not None else None), mean, rstd


def bwd(C, dy, h, w, b, mean, rstd, dh, rms):
    dx = torch.empty(h.shape, dtype=h.dtype)
    dw = torch.empty_like(w) if w is not None else torch.empty(0)
    db = torch.empty_like(b) if b is not None else torch.empty(0)
    C.layer_norm_bwd(dy, h, w, b, mean, rstd, dh, rms, dx, dw, db)
    return dx, dw, db


def _rows(M, N, dt, strided):
    """(M, N) with unit column stride; ``strided``: rows of a wider buffer (row stride N + 3)."""
    if strided:
        return torch.randn(M, N + 3, dtype=dt)[:, 2:N + 2]
    return torch.randn(M, N, dtype=dt)


# ----------------------------------------------------------------------------- parity sweep
CASES = [  # (M, N, rms, residual dtype ("x": x's), weight dtype ("x", None, or a dtype), strided)
    (1, 1, False, None, "x", False),
    (3, 7, True, None, "x", True),
    (37, 199, False, "x", "x", True),
    (5, 1031, True, "x", torch.float32, False),
    (64, 129, False, torch.float32, torch.float32, True),
    (4, 4097, False, None, None, False),
    (2, 20000, True, torch.float32, None, False),
]


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,rms,rdt,wdt,strided", CASES)
def test_matches_reference(C, dt, M, N, rms, rdt, wdt, strided):
    rdt = dt if rdt == "x" else rdt
    wdt = dt if wdt == "x" else wdt
    x = _rows(M, N, dt, strided) * 2 + 0.5
    r = None if rdt is None else _rows(M, N, rdt, strided)
    w = None if wdt is None else torch.randn(N, dtype=wdt)
    b = None if wdt is None or rms else torch.randn(N, dtype=wdt)
    y, h, mean, rstd = fwd(C, x, w, b, r, rms)
    hh = x if r is None else x + r
    if r is not None:
        assert torch.equal(h, hh), "h must be eager's x + residual, bit for bit"
    d64 = lambda t: None if t is None else t.double()
    y64, _, m64, r64 = reference.norm_fwd(d64(hh), d64(w), d64(b), None, EPS, rms)
    ye, _, me, re = reference.norm_fwd(x, w, b, r, EPS, rms)
    assert_matches(y, y64, ye, "y")
    assert_matches(rstd, r64, re, "rstd", scale=r64.abs().max().item())
    if not rms:
        assert_matches(mean, m64, me, "mean", scale=max(1.0, hh.double().abs().max().item()))
    else:
        assert mean.numel() == 0

    dy = torch.randn(M, N, dtype=dt)
    dh = None if r is None else torch.randn(M, N, dtype=hh.dtype)
    dx, dw, db = bwd(C, dy, hh, w, b, mean, rstd, dh, rms)
    # The truth takes the kernel's own statistics (checked above), as the op's backward does.
    dx64, dw64, db64 = reference.norm_bwd(dy.double(), hh.double(), d64(w), None if rms else mean.double(),
                                          rstd.double(), d64(dh), rms, b is not None)
    dxe, dwe, dbe = reference.norm_bwd(dy, hh, w, None if rms else mean, rstd, dh, rms, b is not None)
    # Scales: the size of the terms each gradient sums (they cancel), as helpers.assert_matches takes it.
    g = dy.double()
    wmax = 1.0 if w is None else w.double().abs().max().item()
    assert_matches(dx, dx64, dxe, "dx", scale=(rstd.double() * g.abs().amax(1) * wmax)[:, None].clamp_min(1))
    xhat = (hh.double() - (0 if rms else mean.double()[:, None])) * rstd.double()[:, None]
    if w is not None:
        assert_matches(dw, dw64, dwe.to(w.dtype), "dweight", scale=max(1.0, (g * xhat).abs().sum(0).max().item()))
    else:
        assert dw.numel() == 0
    if b is not None:
        assert_matches(db, db64, dbe.to(b.dtype), "dbias", scale=max(1.0, g.abs().sum(0).max().item()))


# ----------------------------------------------------------------------------- hard rows, NaN/Inf
@pytest.mark.parametrize("rms", [False, True])
def test_large_offset_keeps_fp32_precision(C, rms):
    """Rows of 1e4 + noise: a one-pass E[x^2] - E[x]^2 would lose every digit of the variance."""
    x = 1e4 + torch.randn(16, 4096)
    y, _, _, rstd = fwd(C, x, None, None, None, rms)
    truth = reference.norm_fwd(x.double(), None, None, None, EPS, rms)[0]
    eager = F.rms_norm(x, (4096,), eps=EPS) if rms else F.layer_norm(x, (4096,), eps=EPS)
    err, err_torch = (y.double() - truth).abs().max().item(), (eager.double() - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


def test_shift_far_from_the_mean(C):
    """The one-pass sums are taken around the mean of a row's first 8 values: rows whose first values
    are outliers need the kernel's second pass around the mean (1-pass: ~5e-4 relative error here)."""
    x = torch.randn(4, 65536)
    x[:, :8] += 1e6
    y, _, mean, rstd = fwd(C, x, None, None, None, False)
    y64, _, m64, r64 = reference.norm_fwd(x.double(), None, None, None, EPS, False)
    torch.testing.assert_close(rstd.double(), r64, rtol=2e-6, atol=0)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_constant_and_zero_rows(C, dt):
    x = torch.randn(4, 33, dtype=dt)
    x[0] = 0
    x[1] = 3.25
    w, b = torch.randn(33, dtype=dt), torch.randn(33, dtype=dt)
    y, _, mean, rstd = fwd(C, x, w, b, None, False)
    assert mean[1].item() == 3.25 and rstd[1].item() == pytest.approx(EPS ** -0.5, rel=1e-6)
    assert torch.equal(y[0], b) and torch.equal(y[1], b)  # xhat is exactly 0: y = b
    y, _, _, rstd = fwd(C, x, w, None, None, True)
    assert torch.equal(y[0], torch.zeros_like(y[0])) and torch.isfinite(y).all()


@pytest.mark.parametrize("rms", [False, True])
def test_nan_inf_propagate_as_torch(C, rms):
    x = torch.randn(5, 19)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3, 18] = -float("inf")
    y, _, _, rstd = fwd(C, x, None, None, None, rms)
    eager = F.rms_norm(x, (19,), eps=EPS) if rms else F.layer_norm(x, (19,), eps=EPS)
    torch.testing.assert_close(y, eager, equal_nan=True)
    assert torch.isfinite(y[[0, 4]]).all()
    dy = torch.randn(5, 19)
    dx, _, _ = bwd(C, dy, x, None, None, torch.empty(0) if rms else fwd(C, x, None, None, None, False)[2], rstd,
                   None, rms)
    assert torch.isfinite(dx[[0, 4]]).all() and torch.isnan(dx[1]).all()


def test_empty_rows_give_torch_statistics(C):
    """N == 0 (the public op handles it; the kernel still does not read anything): mean 0, rstd NaN."""
    y, _, mean, rstd = fwd(C, torch.empty(3, 0), None, None, None, False)
    assert torch.equal(mean, torch.zeros(3)) and torch.isnan(rstd).all()


def test_bitwise_deterministic(C):
    x, r = torch.randn(301, 515), torch.randn(301, 515)
    w, b = torch.randn(515), torch.randn(515)
    dy, dh = torch.randn(301, 515), torch.randn(301, 515)
    outs = []
    for _ in range(2):
        y, h, mean, rstd = fwd(C, x, w, b, r, False)
        outs.append((y, h, mean, rstd, *bwd(C, dy, h, w, b, mean, rstd, dh, False)))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------- bad arguments
M_, N_ = 6, 10


def _fwd_args(rms=False, residual=True):
    x = torch.randn(M_, N_)
    r = torch.randn(M_, N_) if residual else None
    return dict(x=x, weight=torch.randn(N_), bias=None if rms else torch.randn(N_), residual=r, eps=EPS, rms=rms,
                y=torch.empty(M_, N_), h=torch.empty(M_, N_) if residual else torch.empty(0),
                mean=torch.empty(0) if rms else torch.empty(M_), rstd=torch.empty(M_))


def _bwd_args(rms=False):
    return dict(dy=torch.randn(M_, N_), h=torch.randn(M_, N_), weight=torch.randn(N_),
                bias=None if rms else torch.randn(N_), mean=torch.empty(0) if rms else torch.randn(M_),
                rstd=torch.rand(M_) + 0.5, dh=torch.randn(M_, N_), rms=rms, dx=torch.empty(M_, N_),
                dweight=torch.empty(N_), dbias=torch.empty(0) if rms else torch.empty(N_))


_COLS = lambda t: torch.randn(t.shape[0], 2 * t.shape[1])[:, ::2]  # column stride 2
_INT = lambda t: t.to(torch.int32)
_META = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")

FWD_BAD = [  # (argument, mutation, message fragment)
    ("x", _INT, "x must be float32"),
    ("x", lambda t: t[None], "x must be 2-D"),
    ("x", _COLS, "x must have unit column stride"),
    ("x", _META, ""),
    ("residual", lambda t: t[:, :-1], "residual must have shape"),
    ("residual", _COLS, "residual must have unit column stride"),
    ("residual", _INT, "residual must be float32"),
    ("weight", lambda t: t[:-1], "weight must have shape"),
    ("weight", lambda t: torch.randn(2 * N_)[::2], "weight must be contiguous"),
    ("weight", _INT, "weight must be float32"),
    ("bias", lambda t: t[None], "bias must have shape"),
    ("bias", lambda t: t.to(torch.int64), "bias must be float32"),
    ("y", lambda t: t[:-1], "y must have shape"),
    ("y", lambda t: t.double(), "y must have dtype"),
    ("y", lambda t: torch.empty(N_, M_).t(), "y must be contiguous"),
    ("y", _META, ""),
    ("h", lambda t: t.half(), "h must have dtype"),
    ("h", lambda t: t[:, :-1], "h must have shape"),
    ("mean", lambda t: t[:-1], "mean must have shape"),
    ("mean", lambda t: t.double(), "mean must have dtype"),
    ("rstd", lambda t: t.half(), "rstd must have dtype"),
    ("rstd", lambda t: torch.empty(2 * M_)[::2], "rstd must be contiguous"),
]


def _call(op, args):
    return op(*args.values())


def test_good_arguments_pass(C):
    for rms in (False, True):
        for residual in (False, True):
            _call(C.layer_norm_fwd, _fwd_args(rms, residual))
        _call(C.layer_norm_bwd, _bwd_args(rms))


def _cases(bad):
    return [pytest.param(n, f, m or None, id=f"{n}-{m or 'meta device'}") for n, f, m in bad]


@pytest.mark.parametrize("name,mutate,match", _cases(FWD_BAD))
def test_fwd_rejects_bad_argument(C, name, mutate, match):
    args = _fwd_args()
    args[name] = mutate(args[name])
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        _call(C.layer_norm_fwd, args)


def test_fwd_rejects_inconsistent_optional_outputs(C):
    args = _fwd_args(residual=False)
    args["h"] = torch.empty(M_, N_)
    with pytest.raises(RuntimeError, match="h must be empty without a residual"):
        _call(C.layer_norm_fwd, args)
    args = _fwd_args(rms=True)
    args["mean"] = torch.empty(M_)
    with pytest.raises(RuntimeError, match="mean must be empty for RMSNorm"):
        _call(C.layer_norm_fwd, args)


BWD_BAD = [
    ("dy", lambda t: t[:-1], "dy must have shape"),
    ("dy", _COLS, "dy must have unit column stride"),
    ("dy", _INT, "dy must be float32"),
    ("h", lambda t: t[None], "h must be 2-D"),
    ("h", _COLS, "h must have unit column stride"),
    ("h", _META, ""),
    ("weight", lambda t: t[:-1], "weight must have shape"),
    ("weight", lambda t: torch.randn(2 * N_)[::2], "weight must be contiguous"),
    ("bias", lambda t: t[:-1], "bias must have shape"),
    ("mean", lambda t: t[:-1], "mean must have shape"),
    ("mean", lambda t: t.double(), "mean must have dtype"),
    ("rstd", lambda t: t[:-1], "rstd must have shape"),
    ("dh", lambda t: t[:, :-1], "dh must have shape"),
    ("dh", _COLS, "dh must have unit column stride"),
    ("dx", lambda t: t.half(), "dx must have dtype"),
    ("dx", lambda t: torch.empty(N_, M_).t(), "dx must be contiguous"),
    ("dweight", lambda t: t.double(), "dweight must have dtype"),
    ("dweight", lambda t: t[:-1], "dweight must have shape"),
    ("dbias", lambda t: torch.empty(0), "dbias must have shape"),
]


@pytest.mark.parametrize("name,mutate,match", _cases(BWD_BAD))
def test_bwd_rejects_bad_argument(C, name, mutate, match):
    args = _bwd_args()
    args[name] = mutate(args[name])
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        _call(C.layer_norm_bwd, args)


def test_bwd_rejects_gradients_without_parameters(C):
    args = _bwd_args()
    args["weight"] = None
    with pytest.raises(RuntimeError, match="dweight must be empty without weight"):
        _call(C.layer_norm_bwd, args)

"""Direct calls of the C++ CPU bias + Leaky ReLU kernels (``torch.ops.fusedstab_C.bias_leaky_relu_fwd`` /
``bias_leaky_relu_bwd`` / ``linear_leaky_relu_fwd``): argument checks (a wrong dtype, shape, stride or
device of any input or output raises) and a parity sweep against the reference formulas over every
dtype pair, per-row and per-column bias, odd row lengths (the packed mask's padding), slopes of both
signs and NaN, with NaN/Inf inputs; determinism of dbias.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedstab import reference
from fusedstab.ops.bias_leaky_relu import pack_mask, unpack_mask

from helpers import assert_matches

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc(dt):
    return reference.acc_dtype(dt)


def _mask_out(R, L, slope):
    return torch.empty((R, (L + 7) // 8) if slope < 0 else (0,), dtype=torch.uint8)


def fwd(C, x, b, slope, per_row):
    yd = x.dtype if b is None else torch.promote_types(x.dtype, b.dtype)
    y, mask = torch.empty(x.shape, dtype=yd), _mask_out(*x.shape, slope)
    C.bias_leaky_relu_fwd(x, b, slope, per_row, y, mask)
    return y, mask


def _z(x, b, per_row, acc):
    z = x.to(acc)
    if b is not None:
        z = z + (b.to(acc).repeat(x.shape[0] // b.numel())[:, None] if per_row else b.to(acc)[None, :])
    return z


def _nan_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.double().nan_to_num(7.0, 8.0, 9.0), b.double().nan_to_num(7.0, 8.0, 9.0))


SHAPES = [(1, 1, False), (3, 5, False), (7, 17, False), (6, 33, True), (4, 8, True), (9, 1, True), (33, 200, False)]
SLOPES = [0.01, -0.3, 0.0, float("nan")]


@pytest.mark.parametrize("xd", DTYPES, ids=str)
@pytest.mark.parametrize("bd", (None,) + DTYPES, ids=str)
@pytest.mark.parametrize("R,L,per_row", SHAPES)
def test_matches_reference(C, xd, bd, R, L, per_row):
    """y and dx exactly the formula's (one rounding of an fp32/fp64 result); the mask bit for bit, with
    padding bits 0; dbias within fp32 summation error. Every slope, NaN and Inf inputs included."""
    Cc = (3 if R % 3 == 0 else R) if per_row else L
    for slope in SLOPES:
        x = torch.randn(R, L, dtype=xd)
        x.view(-1)[::7] = float("nan") if slope == -0.3 else 0.0
        x.view(-1)[3::11] = float("inf")
        b = None if bd is None else torch.randn(Cc, dtype=bd)
        y, mask = fwd(C, x, b, slope, per_row)
        yd = y.dtype
        z = _z(x, b, per_row, _acc(yd))
        assert _nan_equal(y, torch.where(z > 0, z, z * slope).to(yd)), slope
        if slope < 0:
            assert torch.equal(mask, pack_mask(z > 0))
        dy = torch.randn(R, L, dtype=yd)
        dx, db = torch.empty(R, L, dtype=xd), torch.empty(Cc, dtype=_acc(yd))
        C.bias_leaky_relu_bwd(dy, mask if slope < 0 else y, slope, per_row, Cc, dx, db)
        g = dy.to(_acc(yd))
        pos = z > 0 if slope < 0 else y > 0
        dz = torch.where(pos, g, g * slope)
        assert _nan_equal(dx, dz.to(xd)), slope
        want = dz.double().sum(1).view(-1, Cc).sum(0) if per_row else dz.double().sum(0)
        torch.testing.assert_close(db.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_backward_without_dx_or_dbias(C):
    x, b = torch.randn(8, 24), torch.randn(24)
    y, mask = fwd(C, x, b, -0.1, False)
    dy = torch.randn(8, 24)
    dx_full, db_full = torch.empty(8, 24), torch.empty(24)
    C.bias_leaky_relu_bwd(dy, mask, -0.1, False, 24, dx_full, db_full)
    db = torch.empty(24)
    C.bias_leaky_relu_bwd(dy, mask, -0.1, False, 24, torch.empty(0), db)
    dx = torch.empty(8, 24)
    C.bias_leaky_relu_bwd(dy, mask, -0.1, False, 24, dx, torch.empty(0))
    assert torch.equal(db, db_full) and torch.equal(dx, dx_full)


@pytest.mark.parametrize("per_row", [False, True])
def test_dbias_bitwise_deterministic(C, per_row):
    x, dy = torch.randn(512, 300), torch.randn(512, 300)
    Cc = 8 if per_row else 300
    y, _ = fwd(C, x, torch.randn(Cc), 0.01, per_row)
    outs = []
    for _ in range(2):
        dx, db = torch.empty(512, 300), torch.empty(Cc)
        C.bias_leaky_relu_bwd(dy, y, 0.01, per_row, Cc, dx, db)
        outs.append(db)
    assert torch.equal(*outs)


# ----------------------------------------------------------------------------- Linear + Leaky ReLU
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 7, 9), (33, 64, 17), (70, 96, 203)])
@pytest.mark.parametrize("slope", [0.01, -0.2])
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_matches_reference(C, dt, M, K, N, slope, has_bias):
    x = torch.randn(K, M, dtype=dt).t() if M > 2 else torch.randn(M, K, dtype=dt)  # any strides
    w = torch.randn(N, K, dtype=dt) * K ** -0.5
    b = torch.randn(N, dtype=dt) if has_bias else None
    y, mask = torch.empty(M, N, dtype=dt), _mask_out(M, N, slope)
    C.linear_leaky_relu_fwd(x, w, b, slope, y, mask)
    truth = F.leaky_relu(F.linear(x.double(), w.double(), None if b is None else b.double()), slope)
    z = F.linear(x, w, b)
    assert_matches(y, truth, F.leaky_relu(z, slope), "y", scale=max(1.0, K ** 0.5))
    if slope < 0:  # torch's z and the kernel's may round apart: signs may differ only next to 0
        pos = unpack_mask(mask, N)
        assert ((pos == (z > 0)) | (z.double().abs() < 1e-2)).all()
        assert torch.equal(mask, pack_mask(pos))  # padding bits 0


# ----------------------------------------------------------------------------- bad arguments
R_, L_ = 6, 12
_INT = lambda t: t.to(torch.int32)
_META = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")
_TRANSPOSED = lambda t: t.t().contiguous().t()


def _fwd_args(slope=-0.1, per_row=False):
    return dict(x=torch.randn(R_, L_), bias=torch.randn(3 if per_row else L_), slope=slope, per_row=per_row,
                y=torch.empty(R_, L_), mask=_mask_out(R_, L_, slope))


def _bwd_args(slope=-0.1, per_row=False):
    return dict(dy=torch.randn(R_, L_), saved=torch.zeros(R_, 2, dtype=torch.uint8) if slope < 0 else
                torch.randn(R_, L_), slope=slope, per_row=per_row, C=3 if per_row else L_, dx=torch.empty(R_, L_),
                dbias=torch.empty(3 if per_row else L_))


def _linear_args(slope=-0.1):
    return dict(x=torch.randn(R_, 5), weight=torch.randn(L_, 5), bias=torch.randn(L_), slope=slope,
                y=torch.empty(R_, L_), mask=_mask_out(R_, L_, slope))


FWD_BAD = [
    ("x", _INT, "x must be float32"),
    ("x", lambda t: t[None], "x must be 2-D"),
    ("x", _TRANSPOSED, "x must be contiguous"),
    ("x", _META, None),
    ("bias", lambda t: t[:-1], "one value per column"),
    ("bias", lambda t: t[None], "bias must be 1-D"),
    ("bias", _INT, "bias must be float32"),
    ("y", lambda t: t.double(), "y must have dtype"),
    ("y", lambda t: t[:, :-1], "y must have shape"),
    ("y", _TRANSPOSED, "y must be contiguous"),
    ("mask", lambda t: t[:, :1], "mask must have shape"),
    ("mask", lambda t: t.to(torch.int8), "mask must have dtype"),
    ("mask", lambda t: torch.empty(0, dtype=torch.uint8), "mask must have shape"),
]

BWD_BAD = [
    ("dy", _INT, "dy must be float32"),
    ("dy", _TRANSPOSED, "dy must be contiguous"),
    ("dy", _META, None),
    ("saved", lambda t: t[:, :1], "saved .* must have shape"),
    ("saved", lambda t: t.to(torch.int8), "saved .* must have dtype"),
    ("dx", lambda t: t[:-1], "dx must have shape"),
    ("dx", _TRANSPOSED, "dx must be contiguous"),
    ("dx", lambda t: t.double(), "dx .* must not be wider than dy"),
    ("dx", _INT, "dx must be float32"),
    ("dbias", lambda t: t.double(), "dbias must have dtype"),
    ("dbias", lambda t: t[:-1], "dbias must have shape"),
    ("C", lambda c: c - 1, "C == columns"),
]

LINEAR_BAD = [
    ("x", _INT, "x must be float32"),
    ("x", lambda t: t[None], "x must be 2-D"),
    ("weight", lambda t: t[:, :-1], "weight must have shape"),
    ("weight", lambda t: t.double(), "weight must have x's dtype"),
    ("bias", lambda t: t[:-1], "bias must have shape"),
    ("bias", lambda t: t.half(), "bias must have x's dtype"),
    ("y", lambda t: t[:-1], "y must have shape"),
    ("y", lambda t: t.half(), "y must have dtype"),
    ("y", _TRANSPOSED, "y must be contiguous"),
    ("mask", lambda t: t[:-1], "mask must have shape"),
]


def _cases(bad):
    return [pytest.param(n, f, m, id=f"{n}-{m or 'meta device'}") for n, f, m in bad]


def _call(op, args):
    return op(*args.values())


def test_good_arguments_pass(C):
    for slope in (-0.1, 0.1):
        for per_row in (False, True):
            _call(C.bias_leaky_relu_fwd, _fwd_args(slope, per_row))
            _call(C.bias_leaky_relu_bwd, _bwd_args(slope, per_row))
        _call(C.linear_leaky_relu_fwd, _linear_args(slope))


@pytest.mark.parametrize("name,mutate,match", _cases(FWD_BAD))
def test_fwd_rejects_bad_argument(C, name, mutate, match):
    args = _fwd_args()
    args[name] = mutate(args[name])
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        _call(C.bias_leaky_relu_fwd, args)


@pytest.mark.parametrize("name,mutate,match", _cases(BWD_BAD))
def test_bwd_rejects_bad_argument(C, name, mutate, match):
    args = _bwd_args()
    args[name] = mutate(args[name])
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        _call(C.bias_leaky_relu_bwd, args)


@pytest.mark.parametrize("name,mutate,match", _cases(LINEAR_BAD))
def test_linear_rejects_bad_argument(C, name, mutate, match):
    args = _linear_args()
    args[name] = mutate(args[name])
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        _call(C.linear_leaky_relu_fwd, args)


def test_slope_sign_decides_what_is_saved(C):
    """slope >= 0 saves y, slope < 0 the mask: the other kind is refused, in both directions."""
    args = _fwd_args(slope=0.1)
    args["mask"] = torch.empty(R_, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="mask must be empty for slope >= 0"):
        _call(C.bias_leaky_relu_fwd, args)
    args = _bwd_args(slope=0.1)
    args["saved"] = torch.zeros(R_, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"saved \(y, slope >= 0\) must have shape"):
        _call(C.bias_leaky_relu_bwd, args)


def test_per_row_bias_must_divide_rows(C):
    args = _fwd_args(per_row=True)
    args["bias"] = torch.randn(4)
    with pytest.raises(RuntimeError, match="must be a multiple of the bias size"):
        _call(C.bias_leaky_relu_fwd, args)
    args = _bwd_args(per_row=True)
    args["C"], args["dbias"] = 4, torch.empty(4)
    with pytest.raises(RuntimeError, match="must be a multiple of C"):
        _call(C.bias_leaky_relu_bwd, args)

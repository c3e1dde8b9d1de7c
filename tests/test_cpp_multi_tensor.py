"""Direct calls of the C++ CPU multi-tensor kernels (``torch.ops.fusedstab_C.multi_tensor_norm`` /
``multi_tensor_scale_``): argument checks (empty list, mixed dtypes, devices, non-dense tensors, a wrong
output, a coefficient of the wrong size raise) and a parity sweep against ``fusedstab.reference`` over
dtypes, every norm type (negative and fractional p too), dense layouts (contiguous, channels_last,
permuted, empty), multi-chunk tensors and NaN/Inf; the norm is bitwise the same at any thread count.
"""
from __future__ import annotations

import math

import pytest
import torch

from fusedstab import reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORMS = (2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, 0.5, -1.5)
CHUNK = 1 << 16  # csrc/cpu/multi_tensor.cpp's kChunk


def _acc(dt):
    return reference.acc_dtype(dt)


def _tensors(dt):
    big = torch.randn(2 * CHUNK + 17, dtype=dt)  # three chunks, the last one short
    sparse = torch.randn(1000, dtype=dt)
    sparse[::3] = 0
    return [big, torch.randn(1, dtype=dt), torch.empty(0, dtype=dt),
            torch.randn(2, 3, 4, 5, dtype=dt).to(memory_format=torch.channels_last),
            torch.randn(5, 7, dtype=dt).t(), torch.randn(3, 1, 4, dtype=dt).permute(2, 1, 0),
            torch.zeros(9, dtype=dt), sparse]


def norm(C, ts, p):
    out = torch.empty(len(ts), dtype=_acc(ts[0].dtype))
    C.multi_tensor_norm(ts, p, out)
    return out


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("p", NORMS)
def test_norm_matches_reference(C, dt, p):
    ts = _tensors(dt)
    got = norm(C, ts, p)
    want = reference.multi_tensor_norm([t.double() for t in ts], p)
    rtol = 1e-12 if dt == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("p", NORMS)
def test_norm_nan_inf_as_torch(C, dt, p):
    ts = [torch.tensor([1.0, float("nan"), 2.0], dtype=dt), torch.tensor([float("inf"), 1.0], dtype=dt),
          torch.tensor([-0.0, 3.0, -float("inf")], dtype=dt), torch.randn(CHUNK + 5, dtype=dt)]
    ts[3][CHUNK + 2] = float("nan")  # NaN in the last chunk of a tensor: its combine propagates it
    got = norm(C, ts, p)
    want = reference.multi_tensor_norm(ts, p).to(got.dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-5, atol=0)


def test_norm_empty_tensor_gives_identity(C):
    ts = [torch.empty(0), torch.empty(0, 3)]
    for p, want in [(2.0, 0.0), (1.0, 0.0), (math.inf, 0.0), (-math.inf, math.inf), (0.0, 0.0), (-1.0, 0.0)]:
        assert norm(C, ts, p).tolist() == [want, want]


def test_norm_counts_exactly(C):
    t = torch.ones(3 * CHUNK + 1)
    t[::5] = 0
    assert norm(C, [t], 0.0).item() == (t != 0).sum().item()


def test_norm_same_bits_at_any_thread_count(C):
    ts = [torch.randn(5 * CHUNK + 3), torch.randn(777)]
    n = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, n):
            torch.set_num_threads(threads)
            outs.append(norm(C, ts, 2.0))
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(outs[0], o) for o in outs)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("zero_nonfinite", [False, True])
@pytest.mark.parametrize("coef", [0.37, 0.0, 1.0, float("nan")])
def test_scale_matches_reference_bitwise(C, dt, zero_nonfinite, coef):
    ts = _tensors(dt) + [torch.tensor([1.0, float("nan"), float("inf"), -2.0, -0.0], dtype=dt)]
    ref = [t.clone() for t in ts]
    c = torch.tensor(coef, dtype=_acc(dt))
    C.multi_tensor_scale_(ts, c, zero_nonfinite)
    reference.multi_tensor_scale_(ref, c, zero_nonfinite)
    for got, want in zip(ts, ref):
        assert torch.equal(got.nan_to_num(5, 6, 7), want.nan_to_num(5, 6, 7))
        assert torch.equal(torch.isnan(got), torch.isnan(want))


def test_scale_coefficient_of_another_dtype_or_shape(C):
    """coef: any float dtype, one element (0-d or (1,)); t * coef computed in t's accumulation dtype."""
    t = torch.randn(100, dtype=torch.bfloat16)
    ref = (t.float() * 0.3).to(torch.bfloat16)
    for c in (torch.tensor(0.3, dtype=torch.float64), torch.tensor([0.3])):
        a = t.clone()
        C.multi_tensor_scale_([a], c, False)
        assert torch.equal(a, ref)


def test_scale_aliased_tensors_in_list_order(C):
    """The same memory twice in the list is scaled twice, as a loop over the list would."""
    t = torch.randn(3 * CHUNK)
    view = t[CHUNK:2 * CHUNK]
    want = t.clone()
    want[CHUNK:2 * CHUNK] *= 0.5
    want *= 0.5
    C.multi_tensor_scale_([view, t], torch.tensor(0.5), False)
    assert torch.equal(t, want)


# ----------------------------------------------------------------------------- bad arguments
def test_norm_rejects_bad_arguments(C):
    out = torch.empty(2)
    bad = [
        ([], out, "non-empty list"),
        ([torch.randn(3), torch.randn(3, dtype=torch.float64)], out, "dtype of the first"),
        ([torch.randn(3), torch.randn(4, 4)[:, ::2]], out, "must be dense"),
        ([torch.randn(3), torch.randn(8)[::2]], out, "must be dense"),
        ([torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32)], out, "must be float32"),
        ([torch.randn(3), torch.randn(3)], torch.empty(3), "out must have shape"),
        ([torch.randn(3), torch.randn(3)], torch.empty(2, dtype=torch.float64), "out must have dtype"),
        ([torch.randn(3, dtype=torch.float16)] * 2, torch.empty(2, dtype=torch.float16), "out must have dtype"),
        ([torch.randn(3), torch.randn(3)], torch.empty(4)[::2], "out must be contiguous"),
    ]
    for ts, o, match in bad:
        with pytest.raises(RuntimeError, match=match):
            C.multi_tensor_norm(ts, 2.0, o)
    with pytest.raises((RuntimeError, NotImplementedError)):
        C.multi_tensor_norm([torch.randn(3), torch.empty(3, device="meta")], 2.0, out)


def test_scale_rejects_bad_arguments(C):
    c = torch.tensor(0.5)
    bad = [
        ([], c, "non-empty list"),
        ([torch.randn(3), torch.randn(3).half()], c, "dtype of the first"),
        ([torch.randn(4, 4)[::2]], c, "must be dense"),
        ([torch.ones(3, dtype=torch.int64)], c, "must be float32"),
        ([torch.randn(3)], torch.tensor([0.5, 0.5]), "coef must have one element"),
        ([torch.randn(3)], torch.tensor(1, dtype=torch.int32), "coef must be float32"),
    ]
    for ts, co, match in bad:
        with pytest.raises(RuntimeError, match=match):
            C.multi_tensor_scale_(ts, co, False)

"""The multi-tensor custom ops behind gradient clipping: opcheck, reference agreement, compile."""
import math

import pytest
import torch

import fusedstab
from fusedstab import reference

NORMS = [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0]


def _tensors(dtype=torch.float32):
    # a prime-sized tensor spanning several chunks, tiny ones, a channels_last one, a strided view
    big = torch.randn(16384 * 2 + 17, dtype=dtype)
    cl = torch.randn(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last)
    view = torch.randn(6, 8, dtype=dtype)[:, ::2]
    return [big, torch.randn(1, dtype=dtype), torch.randn(7, 3, dtype=dtype), cl, view]


@pytest.mark.parametrize("norm_type", NORMS)
def test_norm_op_matches_reference_and_opcheck(backend, norm_type):
    ts = _tensors()
    with fusedstab.use_backend(backend):
        got = torch.ops.fusedstab.multi_tensor_norm(ts, norm_type)
        torch.library.opcheck(torch.ops.fusedstab.multi_tensor_norm.default, (ts, norm_type))
    want = reference.multi_tensor_norm([t.double() for t in ts], norm_type)
    assert got.dtype == torch.float32 and got.shape == (len(ts),)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero_nonfinite", [False, True])
def test_scale_op_in_place_and_opcheck(backend, zero_nonfinite):
    ts = _tensors(torch.float16)
    expected = [t.float() * 0.37 for t in ts]
    coef = torch.tensor(0.37)
    with fusedstab.use_backend(backend):
        torch.ops.fusedstab.multi_tensor_scale_(ts, coef, zero_nonfinite)
        torch.library.opcheck(torch.ops.fusedstab.multi_tensor_scale_.default,
                              ([t.clone() for t in ts], coef, zero_nonfinite))
    for t, e in zip(ts, expected):
        torch.testing.assert_close(t, e.half(), rtol=1e-3, atol=1e-3)


def test_scale_by_zero_zeroes_nonfinite_only_when_asked(backend):
    t = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    with fusedstab.use_backend(backend):
        a = t.clone()
        torch.ops.fusedstab.multi_tensor_scale_([a], torch.tensor(0.0), True)
        b = t.clone()
        torch.ops.fusedstab.multi_tensor_scale_([b], torch.tensor(0.0), False)
    assert torch.equal(a, torch.zeros(4))
    assert torch.isnan(b[1]) and torch.isnan(b[2]) and b[0] == 0  # torch's 0 * NaN, 0 * Inf


def test_clip_grad_norm_compiles_fullgraph(backend):
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 300, 17)]
    for p in params:
        p.grad = torch.randn_like(p)
    tref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, tref):
        q.grad = p.grad.clone()
    ref_total = torch.nn.utils.clip_grad_norm_(tref, 0.5)

    def clip(ps, max_norm):
        return fusedstab.utils.clip_grad_norm_(ps, max_norm)

    with fusedstab.use_backend(backend):
        total = torch.compile(clip, fullgraph=True, backend="aot_eager")(params, torch.tensor(0.5))
    torch.testing.assert_close(total, ref_total)
    for p, q in zip(params, tref):
        torch.testing.assert_close(p.grad, q.grad)


def test_norm_op_gives_identity_for_empty_tensor(backend):
    """A rank's empty shard: max |x| -> 0, min |x| -> inf, sums -> 0 (the public functions refuse
    unsharded empty tensors where torch has no identity)."""
    ts = [torch.empty(0), torch.tensor([3.0, -4.0])]
    with fusedstab.use_backend(backend):
        for p, want in [(math.inf, [0.0, 4.0]), (-math.inf, [math.inf, 3.0]), (2.0, [0.0, 25.0])]:
            assert torch.ops.fusedstab.multi_tensor_norm(ts, p).tolist() == want

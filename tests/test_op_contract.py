"""The contract every op keeps on every backend this process has (tests/conftest.py parametrizes
``op_backend`` from the registry): opcheck (schema, fake tensors, autograd registration, AOT
dispatch), real outputs with the fake's metadata, empty input, bitwise run-to-run determinism, and
agreement with the ``torch`` backend (the eager reference). Small fp32 CPU cases: each op's own test
file covers dtypes, shapes and layouts."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedstab
from fusedstab import backend as B

OPS = torch.ops.fusedstab


def _r(*shape, scale=1.0, offset=0.0):
    return torch.randn(*shape) * scale + offset


def _ln(M=5, N=37):
    x, w, b, r = _r(M, N, offset=0.5), _r(N), _r(N), _r(M, N)
    y, h, mean, rstd = OPS.layer_norm_fwd(x, w, b, r, 1e-5, False)
    return x, w, b, r, h, mean, rstd


def _gn(N=2, C=6, S=10):
    x, w, b = _r(N, C, S, offset=1.0), _r(C), _r(C)
    with fusedstab.use_backend("torch"):
        _, mean, rstd = OPS.group_norm_fwd(x, w, b, 3, 1e-5, "silu", 0.01)
    return x, w, b, mean, rstd


def _bn(N=4, C=3, S=10):
    x, w, b = _r(N, C, S, offset=1.0), _r(C), _r(C)
    mean, rstd = x.mean((0, 2)), torch.rsqrt(x.var((0, 2), unbiased=False) + 1e-5)
    return x, w, b, mean, rstd


def _attn(L=5, S=7, empty=False):
    q, k, v = _r(1, 2, L, 8), _r(1, 1, S, 8), _r(1, 1, S, 6)
    with fusedstab.use_backend("torch"):
        o, lse = OPS.attention_fwd(q, k, v, None, True, 0.3, 0.0, 0, 0)
    return q, k, v, o, lse


def _window(norms, W):
    """An adaptive clipper's state (steps, seen, mean, var, window of W) after ``norms``."""
    n = len(norms)
    return torch.tensor([n, n, 0.0, 0.0] + norms + [float("nan")] * (W - n), dtype=torch.float64)


# op -> {case name: () -> args}; the torch backend computes what the cases need beforehand.
CASES = {
    "layer_norm_fwd": {
        "ln": lambda: (_r(5, 37), _r(37), _r(37), None, 1e-5, False),
        "ln_3d_two_dims": lambda: (_r(2, 3, 5, 7), _r(35), _r(35), _r(2, 3, 5, 7), 1e-5, False, 2),
        "add_rms": lambda: (_r(5, 37), _r(37), None, _r(5, 37), 1e-5, True),
        "empty": lambda: (_r(0, 37), _r(37), _r(37), None, 1e-5, False),
    },
    "layer_norm_bwd": {
        "ln": lambda: (lambda x, w, b, r, h, mean, rstd: (_r(5, 37), h, w, b, mean, rstd, _r(5, 37), False))(*_ln()),
        "empty": lambda: (lambda x, w, b, r, h, mean, rstd: (_r(0, 37), h, w, b, mean, rstd, None, False))(*_ln(0)),
    },
    "group_norm_fwd": {
        "silu": lambda: (_r(2, 6, 10, offset=1.0), _r(6), _r(6), 3, 1e-5, "silu", 0.01),
        "channels_last": lambda: (_r(2, 10, 6).transpose(1, 2), _r(6), None, 2, 1e-5, "leaky_relu", 0.2),
        "nhwc_4d": lambda: (_r(2, 6, 3, 4).to(memory_format=torch.channels_last), _r(6), _r(6), 3, 1e-5, "relu", 0.01),
        "empty": lambda: (_r(0, 6, 10), _r(6), _r(6), 3, 1e-5, "none", 0.01),
    },
    "group_norm_bwd": {
        "silu": lambda: (lambda x, w, b, m, r: (_r(*x.shape), x, w, b, m, r, 3, "silu", 0.01))(*_gn()),
        "empty": lambda: (lambda x, w, b, m, r: (_r(*x.shape), x, w, b, m, r, 3, "silu", 0.01))(*_gn(0)),
    },
    "batch_norm_stats": {
        "nchw": lambda: (_r(4, 3, 10, offset=2.0),),
        "empty": lambda: (_r(0, 3, 10),),
    },
    "batch_norm_elemt": {
        "relu": lambda: (lambda x, w, b, m, r: (x, w, b, m, r, "relu", 0.01))(*_bn()),
        "nhwc_4d": lambda: (lambda x, w, b, m, r: (x.view(4, 3, 2, 5).to(memory_format=torch.channels_last), w, b, m, r,
                                                   "silu", 0.01))(*_bn()),
        "empty": lambda: (lambda x, w, b, m, r: (_r(0, 3, 10), w, b, m, r, "relu", 0.01))(*_bn()),
    },
    "batch_norm_bwd_reduce": {
        "silu": lambda: (lambda x, w, b, m, r: (_r(*x.shape), x, w, b, m, r, "silu", 0.01))(*_bn()),
        "empty": lambda: (lambda x, w, b, m, r: (_r(0, 3, 10), _r(0, 3, 10), w, b, m, r, "silu", 0.01))(*_bn()),
    },
    "batch_norm_bwd_elemt": {
        "train": lambda: (lambda x, w, b, m, r: (_r(*x.shape), x, w, b, m, r, _r(2, 3), "leaky_relu", -0.1))(*_bn()),
        "eval": lambda: (lambda x, w, b, m, r: (_r(*x.shape), x, w, None, m, r, None, "none", 0.01))(*_bn()),
    },
    "bias_leaky_relu_fwd": {
        "mask": lambda: (_r(6, 13), _r(13), -0.1, 1),
        "per_row": lambda: (_r(2, 3, 13), _r(3), 0.2, 1),
        "channels_last": lambda: (_r(2, 3, 4, 5).to(memory_format=torch.channels_last), _r(3), -0.1, 1),
        "empty": lambda: (_r(0, 13), _r(13), 0.2, 1),
    },
    "bias_leaky_relu_bwd": {
        "mask": lambda: (_r(6, 13), OPS.bias_leaky_relu_fwd(_r(6, 13), None, -0.1, 1)[1], -0.1, False, 13,
                         torch.float32, True, True),
        "per_row": lambda: (_r(6, 13), OPS.bias_leaky_relu_fwd(_r(6, 13), None, 0.2, 1)[0], 0.2, True, 3,
                            torch.float32, True, True),
        "empty": lambda: (_r(0, 13), _r(0, 13), 0.2, False, 13, torch.float32, True, True),
    },
    "linear_leaky_relu_fwd": {
        "bias": lambda: (_r(5, 7), _r(3, 7), _r(3), 0.2),
        "batched": lambda: (_r(2, 5, 7), _r(3, 7), _r(3), -0.2),
        "mask": lambda: (_r(5, 7).t().contiguous().t(), _r(3, 7), None, -0.5),
        "empty": lambda: (_r(0, 7), _r(3, 7), _r(3), 0.2),
    },
    "attention_fwd": {
        "gqa_causal": lambda: (_r(1, 2, 5, 8), _r(1, 1, 7, 8), _r(1, 1, 7, 6), None, True, 0.3, 0.0, 0, 0),
        "bool_mask": lambda: (_r(2, 2, 5, 8), _r(2, 2, 7, 8), _r(2, 2, 7, 8), torch.rand(2, 2, 5, 7) > 0.3, False,
                              0.3, 0.0, 0, 0),
        "no_keys": lambda: (_r(1, 2, 5, 8), _r(1, 2, 0, 8), _r(1, 2, 0, 8), None, False, 0.3, 0.0, 0, 0),
    },
    "attention_bwd": {
        "gqa_causal": lambda: (lambda q, k, v, o, lse: (_r(*o.shape), q, k, v, o, lse, None, True, 0.3, 0.0, 0, 0,
                                                        False))(*_attn()),
        "additive_mask": lambda: (lambda q, k, v, o, lse: (_r(*o.shape), q, k, v, o, lse, torch.zeros(1, 2, 5, 7),
                                                           True, 0.3, 0.0, 0, 0, True))(*_attn()),
    },
    "multi_tensor_norm": {
        "l2": lambda: ([_r(100), _r(3, 4), _r(0), _r(6, 8)[:, ::2]], 2.0),
        "inf": lambda: ([_r(100), _r(3, 4)], float("inf")),
        "p3": lambda: ([_r(100), _r(1)], 3.0),
    },
    "grad_stats": {
        "mixed": lambda: ([_r(100), _r(3, 4), _r(0), _r(6, 8)[:, ::2]],),
        "inf": lambda: ([torch.tensor([1.0, -float("inf"), 2.0]), torch.tensor([float("inf"), 0.0])],),  # NaN: opcheck compares without equal_nan
    },
    "grad_clip_finish": {
        "fixed": lambda: (torch.rand(3, 4), torch.zeros(4, dtype=torch.float64), None, 0.5, "fixed", 0, 2.5, 0.9,
                          1e-6, 0.9, True, float("inf"), torch.zeros(2, 3, 4), torch.zeros(2, 5, dtype=torch.float64)),
        "zclip": lambda: (torch.rand(3, 4) * 4, torch.tensor([9.0, 9, 1.0, 0.04], dtype=torch.float64), None,
                          float("inf"), "zclip", 5, 2.5, 0.9, 1e-6, 0.9, True, float("inf"), torch.zeros(2, 3, 4),
                          torch.zeros(2, 5, dtype=torch.float64)),
        "quantile": lambda: (torch.rand(1, 4), _window([0.5, 2.0, 1.0, 0.7, 1.5], 7), torch.tensor(1.2), 0.0,
                             "quantile", 3, 2.5, 0.9, 1e-6, 0.8, True, 50.0, torch.zeros(0, 3, 4),
                             torch.zeros(3, 5, dtype=torch.float64)),
        "empty": lambda: (torch.zeros(3, 0), torch.zeros(4, dtype=torch.float64), None, 1.0, "fixed", 0, 2.5, 0.9,
                          1e-6, 0.9, True, float("inf"), torch.zeros(1, 3, 0), torch.zeros(1, 5, dtype=torch.float64)),
    },
    "multi_tensor_scale_": {
        "scale": lambda: ([_r(100), _r(3, 4), _r(0)], torch.tensor(0.5), False),
        "zero": lambda: ([_r(10), _r(3, 4)], torch.tensor(0.0), True),
    },
}
_CASES = [(op, name) for op, cases in CASES.items() for name in cases]
_IDS = [f"{op}-{name}" for op, name in _CASES]


def _args(op, name, seed=0):
    torch.manual_seed(seed)
    return CASES[op][name]()


def _clone(a):
    if isinstance(a, torch.Tensor):
        return a.clone()
    if isinstance(a, (list, tuple)):  # the argument tuple too: ops that mutate get fresh inputs each run
        return type(a)(_clone(t) for t in a)
    return a


def _outputs(op, args):
    """The op's outputs (for the in-place op: its mutated tensors)."""
    out = getattr(OPS, op)(*args)
    return list(args[0]) if op == "multi_tensor_scale_" else list(out if isinstance(out, tuple) else (out,))


def _serves(op_backend, op) -> None:
    if op_backend not in B._impls[op]:
        pytest.skip(f"backend {op_backend!r} has no kernel for {op} yet")


def test_every_op_has_contract_cases():
    assert set(B._impls) == set(CASES)
    assert all(callable(getattr(OPS, op)) for op in CASES)


@pytest.mark.parametrize("op,name", _CASES, ids=_IDS)
def test_opcheck(op_backend, op, name):
    _serves(op_backend, op)
    torch.library.opcheck(getattr(OPS, op).default, _args(op, name))


@pytest.mark.parametrize("op,name", _CASES, ids=_IDS)
def test_real_outputs_have_the_fakes_metadata(op_backend, op, name):
    _serves(op_backend, op)
    args = _args(op, name)
    if op == "multi_tensor_scale_":
        pytest.skip("an in-place op: no outputs")
    real = _outputs(op, _clone(args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                     [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args]
        fake = _outputs(op, fake_args)
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.device) == (f.shape, f.dtype, f.device)
        if r.numel() > 1:
            assert r.stride() == f.stride()


@pytest.mark.parametrize("op,name", _CASES, ids=_IDS)
def test_deterministic_run_to_run(op_backend, op, name):
    _serves(op_backend, op)
    args = _args(op, name)
    first, second = _outputs(op, _clone(args)), _outputs(op, _clone(args))
    for a, b in zip(first, second):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), op  # 0-d too


@pytest.mark.parametrize("op,name", _CASES, ids=_IDS)
def test_agrees_with_the_torch_backend(op_backend, op, name):
    _serves(op_backend, op)
    args = _args(op, name)
    got = _outputs(op, _clone(args))
    with fusedstab.use_backend("torch"):
        want = _outputs(op, _clone(args))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.dtype == torch.uint8:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, equal_nan=True)

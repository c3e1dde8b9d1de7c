"""BatchNorm (+ fused activation): ``fusedstab.functional.batch_norm(input, running_mean, running_var,
weight, bias, training, momentum, eps, activation, negative_slope)`` and ``fusedstab.nn.BatchNorm1d/2d/3d``.

Every result is compared with a float64 truth (``torch.nn.functional.batch_norm`` and the activation on
float64 copies of the very same inputs and running statistics) and with eager torch in the test dtype
(the same calls), by the per-dtype rule in ``helpers`` (fp32/fp64 tight, relative to each result's
conditioning scale; fp16/bf16 at most 2x torch's own error). That covers the output, the gradients of
input, weight and bias, and the running statistics the call updates in place. Numerics run on both the
``triton`` backend (on CPU through the Triton interpreter) and the ``torch`` backend; tests parametrized
on device also run on CUDA under the ``gpu`` mark, where bf16 is checked too.

Then the API: the custom ops' contracts (opcheck, outputs), torch.compile(fullgraph=True), gradcheck,
the ``nn.BatchNorm*d`` drop-ins for torch's (running statistics, momentum=None, num_batches_tracked,
track_running_stats=False, train/eval), and the errors torch raises for bad input.
Shapes stay small: the interpreter is slow.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import re

import pytest
import torch
import torch.nn.functional as F

import fusedstab
import fusedstab.nn as fnn
from fusedstab import functional as FS
from fusedstab import reference

from helpers import (DEVICES, TIGHT, act_fn, act_grad_bound, assert_matches, assert_raises_like_torch,
                     assert_same_nonfinite, device_dtypes, graph_recorder, keeps_layout, leaf, run, same_layout)

OPS = torch.ops.fusedstab
EPS = 1e-5
# API tests (custom ops, compile) run where the triton backend runs: CUDA if there is a GPU, else CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (activation, negative_slope): slope matters for leaky_relu only (0 < s < 1, and a negative one).
ACTS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.1),
        ("silu", 0.01)]
ACT_IDS = ["none", "relu", "leaky0.01", "leaky0.2", "leaky-0.1", "silu"]
MODES = ("train", "eval")


def _interp(backend, device="cpu") -> bool:
    """The triton backend on CPU tensors: the Triton interpreter, slow (trimmed parametrizations)."""
    return backend == "triton" and device == "cpu"


def _clone(t):
    return None if t is None else t.detach().clone()


def _to(t, dtype):
    return None if t is None else t.detach().to(dtype)


# ----------------------------------------------------------------------------- calling the ops
def torch_bn(x, rm, rv, w, b, training, momentum=0.1, eps=EPS, activation=None, slope=0.01):
    """Eager torch: F.batch_norm (updating rm / rv in place) then the activation."""
    return act_fn(F.batch_norm(x, rm, rv, w, b, training, momentum, eps), activation, slope)


def fs_bn(x, rm, rv, w, b, training, momentum=0.1, eps=EPS, activation=None, slope=0.01):
    return FS.batch_norm(x, rm, rv, w, b, training, momentum, eps, activation=activation, negative_slope=slope)


def float64_stats(x, rm, rv, training, eps=EPS):
    """(mean, rstd, k) per channel in float64 that normalize x: the batch's (biased variance) in
    training or without running statistics, else the running ones; k = 1 + |mean| * rstd is the
    conditioning of the centring (a channel of nearly equal values loses digits to the subtraction)."""
    C = x.shape[1]
    if training or rm is None:
        xc = x.detach().double().transpose(0, 1).reshape(C, -1)
        mean = xc.mean(1)
        var = (xc - mean[:, None]).square().mean(1)
    else:
        mean, var = rm.detach().double(), rv.detach().double()
    rstd = torch.rsqrt(var + eps)
    return mean, rstd, 1 + mean.abs() * rstd


def cond_scales(x, rm, rv, w, b, dy, training, activation, slope, eps=EPS):
    """Conditioning scales (the size of the terms each result is computed from), in float64:

    - y: per channel, k * max(1, max |w * xhat| + |b|) * max|act'|;
    - dx: per channel, rstd * max |w * dy| * max|act'| * k (in training dx is a difference of terms
      of that size);
    - dweight / dbias: per channel, the sums over (batch, spatial) of |dy| * max|act'| * (|xhat| + k)
      and |dy| * max|act'| * k.

    Shaped to broadcast: y and dx like x, dweight and dbias (C,)."""
    N, C = x.shape[:2]
    if x.numel() == 0:
        return 1.0, 1.0, 1.0, 1.0
    with torch.no_grad():
        mean, rstd, k = float64_stats(x, rm, rv, training, eps)
        x3 = x.detach().double().reshape(N, C, -1)
        xhat = (x3 - mean[:, None]) * rstd[:, None]
        wd = torch.ones(C, dtype=torch.float64, device=x.device) if w is None else w.detach().double()
        bd = torch.zeros(C, dtype=torch.float64, device=x.device) if b is None else b.detach().double()
        a = act_grad_bound(activation, slope)
        zmax = ((wd[:, None] * xhat).abs() + bd.abs()[:, None]).amax((0, 2)).clamp(min=1.0)
        sy = (k * zmax * a)[:, None].expand(N, C, x3.shape[-1])
        dy3 = dy.detach().double().reshape(N, C, -1)
        wdy_max = (dy3 * wd[:, None]).abs().amax((0, 2))
        sdx = (rstd * wdy_max * a * k).clamp(min=1.0)[:, None].expand(N, C, x3.shape[-1])
        ady = dy3.abs() * a
        sdw = (ady * (xhat.abs() + k[:, None])).sum((0, 2)).clamp(min=1.0)
        sdb = (ady * k[:, None]).sum((0, 2)).clamp(min=1.0)
        return sy.reshape(x.shape), sdx.reshape(x.shape), sdw, sdb


def preact64(x, rm, rv, w, b, training, eps=EPS):
    """The float64 pre-activation z = batch_norm(x) (for the kink check of relu / leaky_relu)."""
    return F.batch_norm(x.detach().double(), _to(rm, torch.float64), _to(rv, torch.float64),
                        _to(w, torch.float64), _to(b, torch.float64), training, 0.1, eps)


def assert_stats_match(got, truth64, eager, what):
    """Running statistics: each channel relative to its own size (>= 1)."""
    assert_matches(got, truth64, eager, what, scale=truth64.abs().clamp(min=1.0))


def compare(backend, x, w, b, rm, rv, training, momentum=0.1, activation=None, slope=0.01, eps=EPS, dy=None,
            tag="", grads=(True, True, True), kink_check=True):
    """fusedstab under ``backend`` vs the float64 truth vs eager torch: the output (values, dtype,
    shape, and x's memory format where it is contiguous or channels_last(_3d), else contiguous), the
    gradients of x, weight and bias (those given and requiring grad: ``grads``), and the running
    statistics after the call (updated in training, untouched in eval). Returns (y, grads, (rm, rv))."""
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    if kink_check and activation in ("relu", "leaky_relu") and x.numel():
        z = preact64(x, rm, rv, w, b, training, eps)
        zs = max(1.0, z.abs().max().item())
        # finite-precision pre-activations this close to the kink would take the other branch
        assert z.abs().min().item() > 1e-5 * zs, "inputs too close to the activation's kink; change them"
    lv = lambda dt=None: [leaf(t, dt, r) for t, r in zip((x, w, b), grads)]  # noqa: E731
    rm_f, rv_f, rm_e, rv_e = _clone(rm), _clone(rv), _clone(rm), _clone(rv)
    rm_t, rv_t = _to(rm, torch.float64), _to(rv, torch.float64)
    got, gg = run(lambda u, v, c: fs_bn(u, rm_f, rv_f, v, c, training, momentum, eps, activation, slope), lv(), dy,
                  backend)
    eager, ge = run(lambda u, v, c: torch_bn(u, rm_e, rv_e, v, c, training, momentum, eps, activation, slope), lv(),
                    dy)
    truth, gt = run(lambda u, v, c: torch_bn(u, rm_t, rv_t, v, c, training, momentum, eps, activation, slope),
                    lv(torch.float64), dy.double())
    tag = (f"{tag} [{backend}] {'train' if training else 'eval'} act={activation}"
           f"{f'({slope})' if activation == 'leaky_relu' else ''} x{tuple(x.shape)} {x.dtype}"
           + ("" if w is None else f" w {w.dtype}") + ("" if rm is None else f" stats {rm.dtype}"))
    sy, sdx, sdw, sdb = cond_scales(x, rm, rv, w, b, dy, training, activation, slope, eps)
    assert_matches(got, truth, eager, f"{tag} y", scale=sy)
    if keeps_layout(x):
        assert same_layout(got, x), f"{tag}: output strides {got.stride()} != x's {x.stride()}"
    else:
        assert got.is_contiguous(), f"{tag}: output strides {got.stride()} for x's {x.stride()}"
    for name, g, e, t, inp, sc in zip(("dx", "dweight", "dbias"), gg, ge, gt, (x, w, b), (sdx, sdw, sdb)):
        if g is None:
            assert e is None, f"{tag} {name}: no gradient where torch gives one"
            continue
        assert g.dtype == inp.dtype, f"{tag} {name}: dtype {g.dtype} != input's {inp.dtype}"
        assert g.shape == inp.shape, f"{tag} {name}: shape {tuple(g.shape)} != input's {tuple(inp.shape)}"
        assert_matches(g, t, e, f"{tag} {name}", scale=sc)
    if rm is not None:
        for name, f_, e_, t_, orig in (("running_mean", rm_f, rm_e, rm_t, rm), ("running_var", rv_f, rv_e, rv_t, rv)):
            assert f_.dtype == orig.dtype and f_.shape == orig.shape, name
            if training and x.numel():
                assert_stats_match(f_, t_, e_, f"{tag} {name}")
            else:
                assert torch.equal(f_, orig), f"{tag} {name} changed ({'empty batch' if training else 'eval'})"
    return got, gg, (rm_f, rv_f)


def make(shape, device, dtype, wdtype=None, sdtype=None, affine=(True, True), memory_format=None):
    """x (mean 0.5, std 2: a little centring to do), weight ~ 1 + 0.5 N(0, 1), bias ~ 0.5 N(0, 1),
    running_mean ~ 0.3 N(0, 1), running_var ~ U(0.5, 1.5) (a trained network's, not the init's)."""
    C = shape[1]
    x = torch.randn(shape, device=device) * 2 + 0.5
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x = x.to(dtype)
    w = (1 + 0.5 * torch.randn(C, device=device)).to(wdtype or dtype) if affine[0] else None
    b = (0.5 * torch.randn(C, device=device)).to(wdtype or dtype) if affine[1] else None
    rm = (0.3 * torch.randn(C, device=device)).to(sdtype or wdtype or dtype)
    rv = (0.5 + torch.rand(C, device=device)).to(sdtype or wdtype or dtype)
    return x, w, b, rm, rv


# ============================================================================= values and gradients
# (id, shape)
SHAPES = [
    ("NC", (4, 6)),                  # no spatial dims
    ("NC-N2", (2, 5)),               # N * S = 2: the fewest values training accepts
    ("NC-37rows", (37, 5)),          # many rows of an (N, C) input (a strided reduction per channel)
    ("C1-1d", (3, 1, 5)),            # one channel
    ("1d-prime", (3, 7, 11)),        # (N, C, L), primes
    ("1d-N1-S2", (1, 3, 2)),         # batch 1, N * S = 2
    ("batch1-2d", (1, 4, 3, 5)),     # batch 1 with spatial > 1
    ("1x1", (4, 3, 1, 1)),
    ("5x7-C5", (2, 5, 5, 7)),        # non-square, prime
    ("3d", (2, 3, 2, 3, 4)),
    ("big-S", (2, 3, 33, 65)),       # 4290 values a channel, not a power of two
]
EVAL_ONLY = [("NC-N1", (1, 5)), ("1x1-N1", (1, 3, 1, 1))]  # one value a channel: eval only
# interpreter time: the triton backend on CPU runs these (mode, dtype) on these shapes only
INTERP_SHAPES = {
    ("train", torch.float32): [s[0] for s in SHAPES],
    ("train", torch.float16): ["NC", "NC-37rows", "1d-prime", "1x1", "5x7-C5"],
    ("train", torch.float64): ["NC", "1d-prime", "3d"],
    ("eval", torch.float32): ["NC", "1d-prime", "1x1", "5x7-C5", "3d", "NC-N1", "1x1-N1"],
    ("eval", torch.float16): ["5x7-C5", "NC-N1"],
    ("eval", torch.float64): ["3d"],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sid,shape", SHAPES + EVAL_ONLY, ids=[s[0] for s in SHAPES + EVAL_ONLY])
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_values_and_grads(backend, mode, sid, shape, device, dtype):
    """Output, dx, dweight, dbias and the running statistics (momentum 0.1), training and eval, with
    weight, bias and running statistics in the input's dtype."""
    if mode == "train" and (sid, shape) in EVAL_ONLY:
        pytest.skip("one value a channel: training raises (test_bad_input_raises_like_torch)")
    if _interp(backend, device) and sid not in INTERP_SHAPES[mode, dtype]:
        pytest.skip("interpreter time: this dtype and mode are checked on the other shapes")
    x, w, b, rm, rv = make(shape, device, dtype)
    compare(backend, x, w, b, rm, rv, mode == "train", tag=sid)


@pytest.mark.parametrize("sid,shape", [s for s in SHAPES if s[0] in ("NC", "1d-prime", "5x7-C5", "3d")],
                         ids=["NC", "1d-prime", "5x7-C5", "3d"])
def test_training_without_running_stats(backend, sid, shape):
    """training=True with running_mean = running_var = None (track_running_stats=False): batch
    statistics, nothing to update."""
    if _interp(backend) and sid not in ("NC", "5x7-C5"):
        pytest.skip("interpreter time")
    x, w, b, _, _ = make(shape, "cpu", torch.float32)
    compare(backend, x, w, b, None, None, True, activation="silu", tag=sid)


@pytest.mark.parametrize("act,slope", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_activations(backend, act, slope, mode, device, dtype):
    """Each activation fused, forward and backward (NCHW channels_last; other shapes and layouts below)."""
    if _interp(backend, device):
        if dtype != torch.float32 and act in ("relu", "leaky_relu") and slope > 0:
            pytest.skip("interpreter time: fp16 / fp64 relu-like activations with the negative slope")
        if mode == "eval" and (dtype != torch.float32 or act in (None, "leaky_relu") and slope != 0.2):
            pytest.skip("interpreter time: relu, leaky_relu(0.2), silu in eval in fp32 (dtypes: test_values_and_grads)")
    x, w, b, rm, rv = make((3, 6, 5, 7), device, dtype, memory_format=torch.channels_last)
    got, _, _ = compare(backend, x, w, b, rm, rv, mode == "train", 0.1, act, slope, tag="act channels_last")
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act,slope", [("relu", 0.01), ("leaky_relu", -0.1), ("silu", 0.01)],
                         ids=["relu", "leaky-0.1", "silu"])
@pytest.mark.parametrize("sid,shape", [s for s in SHAPES if s[0] in ("NC-37rows", "C1-1d", "3d")],
                         ids=["NC-37rows", "C1-1d", "3d"])
def test_activation_shapes(backend, act, slope, sid, shape):
    """The activations on the odd shapes too (fp32, training)."""
    if backend == "triton" and act != "silu" and sid != "NC-37rows":
        pytest.skip("interpreter time: relu / leaky_relu on the (N, C) shape, silu on all")
    x, w, b, rm, rv = make(shape, "cpu", torch.float32)
    compare(backend, x, w, b, rm, rv, True, 0.1, act, slope, tag=sid)


@pytest.mark.parametrize("act", ("relu", "silu"))
def test_negative_slope_ignored_unless_leaky(backend, act):
    x, w, b, rm, rv = make((2, 6, 3, 4), "cpu", torch.float32)
    with fusedstab.use_backend(backend):
        a = fs_bn(x, None, None, w, b, True, 0.1, EPS, act, 0.01)
        c = fs_bn(x, None, None, w, b, True, 0.1, EPS, act, 0.37)
    assert torch.equal(a, c)


@pytest.mark.parametrize("eps", (1e-3, 0.5))
@pytest.mark.parametrize("mode", MODES)
def test_eps(backend, eps, mode):
    """A non-default eps (small inputs, so that eps matters) is used as torch uses it."""
    if _interp(backend) and (mode == "train") != (eps == 0.5):
        pytest.skip("interpreter time: eps 0.5 in training, 1e-3 in eval")
    x, w, b, rm, rv = make((3, 6, 3, 4), "cpu", torch.float32)
    x, rv = x * 0.05, rv * 0.01
    compare(backend, x, w, b, rm, rv, mode == "train", 0.1, "silu", eps=eps, tag=f"eps={eps}")
    with fusedstab.use_backend(backend):
        y = fs_bn(x, _clone(rm), _clone(rv), w, b, mode == "train", 0.1, eps)
    assert not torch.allclose(y, F.batch_norm(x, _clone(rm), _clone(rv), w, b, mode == "train", 0.1, EPS),
                              rtol=1e-2, atol=1e-2)


def test_eval_eps_zero(backend):
    """eps = 0 is refused in training only (as torch): eval with eps = 0 normalizes by the running
    variance alone."""
    x, w, b, rm, rv = make((3, 6, 4), "cpu", torch.float32)
    compare(backend, x, w, b, rm, rv, False, 0.1, "silu", eps=0.0, tag="eval eps=0")


AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("affine", AFFINE, ids=["affine", "weight_only", "bias_only", "no_affine"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.bfloat16)))
def test_weight_bias_none(backend, affine, mode, device, dtype):
    """Each of weight and bias may be None (then no gradient for it), with the activation after."""
    if _interp(backend, device) and (mode == "eval" or dtype != torch.float32) and affine not in AFFINE[1:3]:
        pytest.skip("interpreter time: fp16 and eval with the weight or the bias alone")
    if _interp(backend, device) and mode == "eval" and dtype != torch.float32:
        pytest.skip("interpreter time: eval in fp32")
    act, slope = "leaky_relu", -0.1
    x, w, b, rm, rv = make((3, 6, 4, 3), device, dtype, affine=affine)
    _, (dx, dw, db), _ = compare(backend, x, w, b, rm, rv, mode == "train", 0.1, act, slope, tag=f"affine={affine}")
    assert (dw is None) == (w is None) and (db is None) == (b is None)


@pytest.mark.parametrize("which", ("x", "weight", "bias"))
def test_requires_grad_subsets(backend, which):
    """Only one input requires grad: its gradient is right, the others get none."""
    if _interp(backend) and which != "weight":
        pytest.skip("interpreter time: the weight alone")
    x, w, b, rm, rv = make((3, 6, 4, 3), "cpu", torch.float32)
    flags = tuple(n == which for n in ("x", "weight", "bias"))
    _, gs, _ = compare(backend, x, w, b, rm, rv, True, 0.1, "silu", grads=flags, tag=f"only {which}")
    assert [g is not None for g in gs] == list(flags)


def test_no_grad(backend):
    """Inference: no graph, the same values, the same running statistics."""
    x, w, b, rm, rv = make((3, 6, 4, 3), "cpu", torch.float32)
    r1, r2 = (_clone(rm), _clone(rv)), (_clone(rm), _clone(rv))
    with fusedstab.use_backend(backend):
        y = fs_bn(x, *r1, w, b, True, 0.1, EPS, "silu")
        with torch.no_grad():
            y2 = fs_bn(leaf(x), *r2, leaf(w), leaf(b), True, 0.1, EPS, "silu")
    assert y.grad_fn is None and y2.grad_fn is None
    assert torch.equal(y, y2)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])


# (device, x dtype, weight/bias/running stats dtype): torch.nn.functional.batch_norm takes fp16/bf16
# input with fp32 parameters and running statistics (mixed precision): output and dx in the input's
# dtype, dweight/dbias in fp32, running statistics updated in fp32.
MIXED = [
    pytest.param("cpu", torch.float16, torch.float32, id="cpu-fp16x-fp32w"),
    pytest.param("cuda", torch.float16, torch.float32, id="cuda-fp16x-fp32w", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, torch.float32, id="cuda-bf16x-fp32w", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("act,slope", [(None, 0.01), ("silu", 0.01)], ids=["none", "silu"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,xdt,wdt", MIXED)
def test_mixed_dtype(backend, act, slope, mode, device, xdt, wdt):
    cases = (((3, 6, 5, 7), torch.channels_last), ((4, 10, 3), None))
    if device == "cpu" and backend == "triton" and mode == "eval":
        cases = cases[:1]
    for shape, mf in cases:
        x, w, b, rm, rv = make(shape, device, xdt, wdtype=wdt, memory_format=mf)
        got, (dx, dw, db), (rm2, rv2) = compare(backend, x, w, b, rm, rv, mode == "train", 0.1, act, slope,
                                                tag=f"mixed {mf}")
        assert got.dtype == xdt and dx.dtype == xdt and dw.dtype == wdt and db.dtype == wdt
        assert rm2.dtype == wdt and rv2.dtype == wdt


def test_mixed_dtype_only_some_fp32(backend):
    """fp16 input with fp32 running statistics and no weight/bias, and with an fp32 weight only."""
    x, w, _, rm, rv = make((3, 6, 4, 3), "cpu", torch.float16, wdtype=torch.float32)
    compare(backend, x, None, None, rm, rv, True, 0.1, "silu", tag="fp16 x, fp32 stats")
    compare(backend, x, w, None, rm, rv, True, 0.1, None, tag="fp16 x, fp32 weight+stats")


# ----------------------------------------------------------------------------- running statistics
@pytest.mark.parametrize("momentum", (0.1, 0.0, 1.0, 0.5))
def test_functional_momentum_several_steps(backend, momentum):
    """running = (1 - momentum) * running + momentum * batch statistic (unbiased variance), over
    three calls on different batches (no grad: the statistics only), against torch and float64."""
    C = 5
    rm, rv = 0.3 * torch.randn(C), 0.5 + torch.rand(C)
    r_f, r_e, r_t = (_clone(rm), _clone(rv)), (_clone(rm), _clone(rv)), (rm.double(), rv.double())
    for step in range(3):
        x = torch.randn(3, C, 4, 2) * (1 + step) + step - 1
        if step == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), fusedstab.use_backend(backend):
            y = fs_bn(x, *r_f, None, None, True, momentum)
        ye = torch_bn(x, *r_e, None, None, True, momentum)
        yt = torch_bn(x.double(), *r_t, None, None, True, momentum)
        assert_matches(y, yt, ye, f"[{backend}] step {step} y")
        for name, g, e, t in zip(("running_mean", "running_var"), r_f, r_e, r_t):
            assert_stats_match(g, t, e, f"[{backend}] momentum={momentum} step {step} {name}")
    if momentum == 0.0:
        assert torch.equal(r_f[0], rm) and torch.equal(r_f[1], rv)
    if momentum == 1.0:  # the last batch's statistics
        xl = x.double().transpose(0, 1).reshape(C, -1)
        torch.testing.assert_close(r_f[0].double(), xl.mean(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r_f[1].double(), xl.var(1, unbiased=True), rtol=1e-6, atol=1e-6)


def _module_pair(name, *args, act=None, slope=0.01, seed=3, **kwargs):
    """(fusedstab module, torch module in the same dtype, torch module in float64): the same
    randomized parameters and running statistics."""
    fs = getattr(fnn, name)(*args, activation=act, negative_slope=slope, **kwargs)
    t = getattr(torch.nn, name)(*args, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if fs.weight is not None:
            fs.weight.copy_(1 + 0.5 * torch.randn(fs.weight.shape, generator=g))
        if fs.bias is not None:
            fs.bias.copy_(0.5 * torch.randn(fs.bias.shape, generator=g))
        if fs.running_mean is not None:
            fs.running_mean.copy_(0.3 * torch.randn(fs.running_mean.shape, generator=g))
            fs.running_var.copy_(0.5 + torch.rand(fs.running_var.shape, generator=g))
    t.load_state_dict(fs.state_dict())
    t64 = copy.deepcopy(t).double()
    return fs, t, t64


def _run_module(m, x, dy, backend=None):
    """Output, dx and the parameter gradients of sum(m(x) * dy) (torch.autograd.grad: no .grad
    accumulation between steps)."""
    xl = leaf(x)
    params = list(m.parameters())
    with fusedstab.use_backend(backend) if backend else contextlib.nullcontext():
        out = m(xl)
        gs = torch.autograd.grad(out, [xl] + params, dy)
    return out.detach(), gs[0], list(gs[1:])


def _module_step(fs, t, t64, x, dy, backend, tag):
    """One forward + backward of the three modules on x: output, dx, parameter gradients and buffers
    compared (fusedstab vs float64 truth vs eager torch)."""
    training = fs.training
    act, slope = fs.activation, fs.negative_slope
    use_batch = training or not fs.track_running_stats
    sy, sdx, sdw, sdb = cond_scales(x, None if use_batch else fs.running_mean, None if use_batch else fs.running_var,
                                    fs.weight, fs.bias, dy, use_batch, act, slope, fs.eps)
    yf, dxf, gpf = _run_module(fs, x, dy, backend)
    # torch's module has no activation: apply it, and take the gradients through it
    ye, dxe, gpe = _run_module(_WithAct(t, act, slope), x, dy)
    yt, dxt, gpt = _run_module(_WithAct(t64, act, slope), x.double(), dy.double())
    assert_matches(yf, yt, ye, f"{tag} y", scale=sy)
    assert_matches(dxf, dxt, dxe, f"{tag} dx", scale=sdx)
    for (n, _), gf, ge, gt in zip(fs.named_parameters(), gpf, gpe, gpt):
        assert_matches(gf, gt, ge, f"{tag} d{n}", scale=sdw if n == "weight" else sdb)
    _check_buffers(fs, t, t64, tag)
    return yf


class _WithAct(torch.nn.Module):
    """torch's module followed by the activation (the same parameters, in the same order)."""

    def __init__(self, m, act, slope):
        super().__init__()
        self.m, self.act, self.slope = m, act, slope

    def forward(self, x):
        return act_fn(self.m(x), self.act, self.slope)


def _check_buffers(fs, t, t64, tag):
    assert [n for n, _ in fs.named_buffers()] == [n for n, _ in t.named_buffers()], tag
    for (n, bf), (_, be), (_, bt) in zip(fs.named_buffers(), t.named_buffers(), t64.named_buffers()):
        assert bf.dtype == be.dtype and bf.shape == be.shape, f"{tag} {n}"
        if n == "num_batches_tracked":
            assert torch.equal(bf, be), f"{tag} num_batches_tracked {bf.item()} != torch's {be.item()}"
        else:
            assert_stats_match(bf, bt, be, f"{tag} {n}")


@pytest.mark.parametrize("momentum", (0.1, 0.0, 1.0, None), ids=str)
def test_module_running_stats_momentum(backend, momentum):
    """BatchNorm2d over three training steps on batches of different statistics, then eval:
    running_mean/var and num_batches_tracked equal torch's (momentum=None: the cumulative average,
    factor 1 / num_batches_tracked), outputs too (no grad: the statistics only)."""
    fs, t, t64 = _module_pair("BatchNorm2d", 4, momentum=momentum, act="silu")
    rm0, rv0 = _clone(fs.running_mean), _clone(fs.running_var)
    batch_stats = []
    for step in range(3):
        x = torch.randn(3, 4, 3, 5) * (1 + step) + 2 * step - 1
        with torch.no_grad(), fusedstab.use_backend(backend):
            y = fs(x)
        with torch.no_grad():
            ye, yt = act_fn(t(x), "silu"), act_fn(t64(x.double()), "silu")
        sy = cond_scales(x, None, None, fs.weight, fs.bias, x, True, "silu", 0.01)[0]
        assert_matches(y, yt, ye, f"[{backend}] momentum={momentum} step {step} y", scale=sy)
        _check_buffers(fs, t, t64, f"[{backend}] momentum={momentum} step {step}")
        xc = x.double().transpose(0, 1).reshape(4, -1)
        batch_stats.append((xc.mean(1), xc.var(1, unbiased=True)))
    assert fs.num_batches_tracked.item() == 3
    # independent of torch's module logic:
    if momentum is None:  # the cumulative average of the three batches' statistics
        exp_m = sum(s[0] for s in batch_stats) / 3
        exp_v = sum(s[1] for s in batch_stats) / 3
    elif momentum == 0.0:
        exp_m, exp_v = rm0.double(), rv0.double()
    elif momentum == 1.0:
        exp_m, exp_v = batch_stats[-1]
    else:
        exp_m, exp_v = rm0.double(), rv0.double()
        for m_, v_ in batch_stats:
            exp_m, exp_v = (1 - momentum) * exp_m + momentum * m_, (1 - momentum) * exp_v + momentum * v_
    torch.testing.assert_close(fs.running_mean.double(), exp_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fs.running_var.double(), exp_v, rtol=1e-5, atol=1e-5)
    fs.eval(), t.eval(), t64.eval()
    x = torch.randn(2, 4, 3, 5)
    with torch.no_grad(), fusedstab.use_backend(backend):
        y = fs(x)
    with torch.no_grad():
        ye, yt = act_fn(t(x), "silu"), act_fn(t64(x.double()), "silu")
    sy = cond_scales(x, fs.running_mean, fs.running_var, fs.weight, fs.bias, x, False, "silu", 0.01)[0]
    assert_matches(y, yt, ye, f"[{backend}] momentum={momentum} eval y", scale=sy)
    assert fs.num_batches_tracked.item() == 3


def test_module_train_eval_switching(backend):
    """train step, eval, train step, eval (forward and backward each, the eval backward through the
    running statistics): everything equal to torch's module followed by the activation."""
    fs, t, t64 = _module_pair("BatchNorm2d", 4, act="leaky_relu", slope=0.2)
    for i, training in enumerate((True, False, True, False)):
        for m in (fs, t, t64):
            m.train(training)
        x = torch.randn(3, 4, 3, 5) * 2 + 0.5
        dy = torch.randn(3, 4, 3, 5)
        _module_step(fs, t, t64, x, dy, backend, f"[{backend}] step {i} {'train' if training else 'eval'}")
    assert fs.num_batches_tracked.item() == 2


@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (4, 5)), ("BatchNorm1d", (3, 5, 4)),
                                        ("BatchNorm2d", (2, 5, 3, 4)), ("BatchNorm3d", (2, 5, 2, 3, 2))],
                         ids=["1d-NC", "1d-NCL", "2d", "3d"])
def test_module_track_running_stats_false(backend, name, shape):
    """track_running_stats=False: no running buffers, batch statistics in training and in eval too
    (the same outputs and gradients in both modes)."""
    if _interp(backend) and len(shape) not in (2, 4):
        pytest.skip("interpreter time: (N, C) and 2-D")
    fs, t, t64 = _module_pair(name, 5, track_running_stats=False, act="silu")
    assert fs.running_mean is None and fs.running_var is None and fs.num_batches_tracked is None
    x, dy = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
    y_train = _module_step(fs, t, t64, x, dy, backend, f"[{backend}] {name} train")
    for m in (fs, t, t64):
        m.eval()
    y_eval = _module_step(fs, t, t64, x, dy, backend, f"[{backend}] {name} eval")
    torch.testing.assert_close(y_eval, y_train, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_module_affine_false(backend, mode):
    fs, t, t64 = _module_pair("BatchNorm3d", 3, affine=False, act="relu")
    assert fs.weight is None and fs.bias is None and list(fs.parameters()) == []
    for m in (fs, t, t64):
        m.train(mode == "train")
    x, dy = torch.randn(2, 3, 2, 3, 4) * 2 + 0.5, torch.randn(2, 3, 2, 3, 4)
    _module_step(fs, t, t64, x, dy, backend, f"[{backend}] affine=False {mode}")


@pytest.mark.parametrize("name,shape,act,slope,fmt",
                         [("BatchNorm1d", (6, 5), None, 0.01, None),
                          ("BatchNorm1d", (3, 5, 7), "leaky_relu", 0.2, None),
                          ("BatchNorm2d", (2, 5, 3, 4), "silu", 0.01, torch.channels_last),
                          ("BatchNorm3d", (2, 5, 2, 3, 2), "relu", 0.01, torch.channels_last_3d)],
                         ids=["1d-NC", "1d-NCL-leaky", "2d-silu-cl", "3d-relu-cl3d"])
def test_module_forward_backward_vs_torch(backend, name, shape, act, slope, fmt):
    fs, t, t64 = _module_pair(name, 5, act=act, slope=slope)
    x = torch.randn(shape) * 2 + 0.5
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    y = _module_step(fs, t, t64, x, torch.randn(shape), backend, f"[{backend}] {name}")
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------- memory formats
def _layout(kind, device, dtype):
    """An input in the given memory layout."""
    if kind == "contiguous":
        return torch.randn(2, 6, 5, 7, device=device).to(dtype)
    if kind == "channels_last":
        return torch.randn(2, 6, 5, 7, device=device).contiguous(memory_format=torch.channels_last).to(dtype)
    if kind == "channels_last_3d":
        x = torch.randn(2, 6, 3, 2, 5, device=device).contiguous(memory_format=torch.channels_last_3d)
        return x.to(dtype)
    if kind == "channels_last_1x1":  # channels_last with 1x1 spatial: also contiguous
        return torch.randn(5, 6, 1, 1, device=device).contiguous(memory_format=torch.channels_last).to(dtype)
    if kind == "nchw_crop":  # a spatial crop of an NCHW tensor: not dense
        return torch.randn(2, 6, 6, 9, device=device).to(dtype)[:, :, 1:4, 2:7]
    if kind == "channels_last_channel_slice":  # channels 1..6 of a channels_last tensor: not dense
        x = torch.randn(2, 8, 4, 5, device=device).contiguous(memory_format=torch.channels_last).to(dtype)
        return x[:, 1:7]
    if kind == "every_other_L":  # (N, C, L) with L stride 2
        return torch.randn(3, 6, 14, device=device).to(dtype)[:, :, ::2]
    if kind == "batch_slice":  # every other sample
        return torch.randn(6, 6, 3, 4, device=device).to(dtype)[::2]
    if kind == "permuted_dense":  # dense but (N, C, L) stored as (L, N, C): not a kept layout
        return torch.randn(5, 2, 6, device=device).to(dtype).permute(1, 2, 0)
    if kind == "transposed_NC":  # (N, C) column-major
        return torch.randn(6, 5, device=device).to(dtype).t()
    if kind == "NC_column_slice":  # (N, C) with a row stride larger than C
        return torch.randn(7, 9, device=device).to(dtype)[:, 2:8]
    if kind == "expanded_batch":  # batch stride 0
        return torch.randn(1, 6, 3, 4, device=device).to(dtype).expand(3, 6, 3, 4)
    raise ValueError(kind)


LAYOUTS = ["contiguous", "channels_last", "channels_last_3d", "channels_last_1x1", "nchw_crop",
           "channels_last_channel_slice", "every_other_L", "batch_slice", "permuted_dense", "transposed_NC",
           "NC_column_slice", "expanded_batch"]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32,), (torch.float32, torch.bfloat16)))
def test_memory_formats(backend, kind, device, dtype):
    """Output in x's memory format (contiguous, channels_last, channels_last_3d), contiguous for any
    other layout; right values, gradients and running statistics for all (training, silu after)."""
    if _interp(backend, device) and kind in ("contiguous", "channels_last", "every_other_L", "batch_slice",
                                              "permuted_dense", "NC_column_slice"):
        pytest.skip("interpreter time: contiguous / channels_last everywhere else, one copy path of each kind")
    x = _layout(kind, device, dtype)
    C = x.shape[1]
    w = (1 + 0.5 * torch.randn(C, device=device)).to(dtype)
    b = (0.5 * torch.randn(C, device=device)).to(dtype)
    rm, rv = (0.3 * torch.randn(C, device=device)).to(dtype), (0.5 + torch.rand(C, device=device)).to(dtype)
    got, _, _ = compare(backend, x, w, b, rm, rv, True, 0.1, "silu", tag=kind)
    if kind == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    if kind == "channels_last_3d":
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
    if kind not in ("channels_last", "channels_last_3d"):
        assert got.is_contiguous()


@pytest.mark.parametrize("kind", ("channels_last", "channels_last_3d", "nchw_crop"))
def test_memory_formats_eval(backend, kind):
    x = _layout(kind, "cpu", torch.float32)
    _, w, b, rm, rv = make(x.shape, "cpu", torch.float32)
    got, _, _ = compare(backend, x, w, b, rm, rv, False, 0.1, "silu", tag=f"eval {kind}")
    if kind != "nchw_crop":
        assert keeps_layout(got) and same_layout(got, x)


@pytest.mark.parametrize("x_fmt,dy_fmt", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                          ("channels_last", "strided")])
def test_upstream_gradient_layout_differs(backend, x_fmt, dy_fmt):
    """The upstream gradient in another layout than x (what a following conv hands back)."""
    if _interp(backend) and (x_fmt, dy_fmt) == ("channels_last", "contiguous"):
        pytest.skip("interpreter time")
    mf = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    x, w, b, rm, rv = make((2, 6, 5, 7), "cpu", torch.float32, memory_format=mf[x_fmt])
    if dy_fmt == "strided":
        dy = torch.randn(2, 6, 10, 7)[:, :, ::2]
    else:
        dy = torch.randn(2, 6, 5, 7).contiguous(memory_format=mf[dy_fmt])
    compare(backend, x, w, b, rm, rv, True, 0.1, "silu", dy=dy, tag=f"x {x_fmt}, dy {dy_fmt}")


@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
@pytest.mark.parametrize("mode", MODES)
def test_expanded_upstream_gradient(backend, fmt, mode):
    """y.sum().backward(): the upstream gradient is an expanded scalar (all strides 0)."""
    if _interp(backend) and fmt == "contiguous":
        pytest.skip("interpreter time: channels_last")
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x, w, b, rm, rv = make((3, 6, 3, 4), "cpu", torch.float32, memory_format=mf)
    dy = torch.ones(()).expand(x.shape)
    training = mode == "train"
    _, grads, _ = compare(backend, x, w, b, rm, rv, training, 0.1, "leaky_relu", 0.2, dy=dy, tag="expanded dy")
    xl, wl, bl = leaf(x), leaf(w), leaf(b)
    with fusedstab.use_backend(backend):
        fs_bn(xl, _clone(rm), _clone(rv), wl, bl, training, 0.1, EPS, "leaky_relu", 0.2).sum().backward()
    for t, g in zip((xl, wl, bl), grads):
        assert torch.equal(t.grad, g)


@pytest.mark.parametrize("kind", ("every_other", "expanded"))
def test_strided_params_and_running_stats(backend, kind):
    """Weight, bias and running statistics that are non-contiguous views (torch accepts any strides;
    the running statistics views are updated in place, through their strides)."""
    x = torch.randn(3, 6, 3, 4)
    base_m, base_v = 0.3 * torch.randn(12), 0.5 + torch.rand(12)
    rm, rv = base_m[::2], base_v[1::2]
    if kind == "every_other":
        w, b = (1 + 0.5 * torch.randn(12))[::2], (0.5 * torch.randn(18))[::3]
    else:
        w, b = torch.tensor(1.5).expand(6), torch.tensor(-0.25).expand(6)
    assert not w.is_contiguous() and not rm.is_contiguous()
    grads = (True, kind != "expanded", kind != "expanded")
    compare(backend, x, w, b, rm, rv, True, 0.1, "silu", tag=f"{kind} weight/bias", grads=grads)
    # in place through the view: the base's other elements untouched
    bm, bv = base_m.clone(), base_v.clone()
    with torch.no_grad(), fusedstab.use_backend(backend):
        fs_bn(x, bm[::2], bv[1::2], w, b, True, 0.1, EPS, "silu")
    em, ev = base_m.clone(), base_v.clone()
    F.batch_norm(x, em[::2], ev[1::2], w, b, True, 0.1, EPS)
    torch.testing.assert_close(bm, em)
    torch.testing.assert_close(bv, ev)
    assert torch.equal(bm[1::2], base_m[1::2]) and torch.equal(bv[::2], base_v[::2])


# ----------------------------------------------------------------------------- special inputs
@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
def test_large_offset_keeps_precision(backend, fmt):
    """fp32 input of mean 1e4 and std 1: the batch variance keeps fp32 precision (Welford / Chan
    statistics; E[x^2] - E[x]^2 loses all of it). momentum=1: the running statistics are the batch's
    own (mean, unbiased variance), held to the fp32 rule against float64 like every running statistic;
    the op's (count, mean, M2) too."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    C = 4
    x = (torch.randn(4, C, 9, 11) + 1e4).contiguous(memory_format=mf)
    w, b = 1 + 0.5 * torch.randn(C), 0.5 * torch.randn(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    compare(backend, x, w, b, rm, rv, True, 1.0, "silu", tag=f"offset 1e4 {fmt}")
    x64 = x.double().transpose(0, 1).reshape(C, -1)
    with fusedstab.use_backend(backend):
        stats = OPS.batch_norm_stats(x.flatten(2))
    count, mean, m2 = stats.double()
    assert torch.equal(count, torch.full((C,), float(x64.shape[1]), dtype=torch.float64))
    rtol, atol = TIGHT[torch.float32]
    torch.testing.assert_close(mean, x64.mean(1), rtol=rtol, atol=atol, msg=lambda m: f"[{backend}] mean: {m}")
    var64 = x64.var(1, unbiased=False)
    torch.testing.assert_close(m2 / count, var64, rtol=rtol, atol=atol * var64.clamp(min=1).max().item(),
                               msg=lambda m: f"[{backend}] M2 / count (the biased batch variance, ~1): {m}")


def _zero_preact_input(training, fmt):
    """(x, w, b, rm, rv) with pre-activations exactly 0 in places: in training channels 0-2 are
    constant (2.0, -0.5, 0.0: powers of two or zero, so x - mean = 0 and x * s - mean * s = 0 in any
    order) with bias 0 there: z = 0 for the whole channel; in eval the elements equal to the (power of
    two) running mean, with bias 0: z = 0 there. Channels 3-5 random."""
    C = 6
    x = torch.randn(3, C, 4, 5) * 2 + 0.5
    w, b = 1 + 0.5 * torch.randn(C), 0.5 * torch.randn(C)
    rm, rv = 0.3 * torch.randn(C), 0.5 + torch.rand(C)
    b[:3] = 0
    if training:
        for c, v in enumerate((2.0, -0.5, 0.0)):
            x[:, c] = v
    else:
        rm[:3] = torch.tensor([0.5, -2.0, 0.0])
        for c in range(3):
            x[:, c, ::2, 1::2] = rm[c]
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b, rm, rv


@pytest.mark.parametrize("act,slope", ACTS[1:], ids=ACT_IDS[1:])
@pytest.mark.parametrize("mode", MODES)
def test_activation_at_exact_zero(backend, act, slope, mode):
    """Pre-activations exactly 0 take torch's branch: relu(0) = 0 with gradient 0, leaky_relu's
    gradient at 0 is the slope, silu'(0) = 0.5 (F.batch_norm then the activation); values and
    gradients against the float64 truth (which has the same exact zeros)."""
    if _interp(backend) and act == "leaky_relu" and (slope == 0.01 or mode == "eval" and slope == 0.2):
        pytest.skip("interpreter time: leaky_relu with slopes 0.2 and -0.1 (eval: -0.1)")
    training = mode == "train"
    fmt = "channels_last" if act == "silu" else "contiguous"
    x, w, b, rm, rv = _zero_preact_input(training, fmt)
    z = preact64(x, rm, rv, w, b, training)
    zero = z == 0
    assert zero.sum() >= (3 * 3 * 20 if training else 3 * 3 * 4), "the input has fewer exact zeros than meant"
    assert (z[~zero].abs() > 1e-5).all()
    got, (dx, dw, db), _ = compare(backend, x, w, b, rm, rv, training, 0.1, act, slope, tag="z=0",
                                   kink_check=False)
    if act in ("relu", "leaky_relu"):
        assert (got[zero] == 0).all(), "act(0) != 0"
    if training and act == "relu":  # the constant channels pass no gradient at all
        assert (dx[:, :3] == 0).all() and (db[:3] == 0).all() and (dw[:3] == 0).all()


def _nonfinite_input(fmt):
    """(3, 6, 4, 5): a NaN in channel 0, +inf in channel 2, +inf and -inf in channel 4."""
    x = torch.randn(3, 6, 4, 5)
    x[0, 0, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[2, 4, 1, 1] = float("inf")
    x[0, 4, 3, 4] = float("-inf")
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


NONFINITE_CASES = [(a, s, "contiguous") for a, s in ACTS if s != 0.01 or a != "leaky_relu"] + [
    ("relu", 0.01, "channels_last"), ("silu", 0.01, "channels_last")]


@pytest.mark.parametrize("act,slope,fmt", NONFINITE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_propagate_like_torch(backend, act, slope, fmt, mode, device):
    """NaN/Inf inputs: torch's NaN/Inf pattern in y, dx, dweight, dbias and the running statistics
    (training: the whole channel NaN, its running statistics NaN; eval: only the element); other
    channels finite and equal to torch's."""
    training = mode == "train"
    if _interp(backend, device) and (not training and (fmt == "channels_last" or act not in (None, "relu"))
                                     or training and act == "leaky_relu" and slope == 0.2):
        pytest.skip("interpreter time: eval with none and relu, training without leaky_relu(0.2)")
    x = _nonfinite_input(fmt).to(device)
    w = 1 + 0.5 * torch.randn(6, device=device)
    b = 0.5 * torch.randn(6, device=device)
    rm, rv = 0.3 * torch.randn(6, device=device), 0.5 + torch.rand(6, device=device)
    dy = torch.randn(x.shape, device=device)
    rf, rt = (_clone(rm), _clone(rv)), (_clone(rm), _clone(rv))
    got, gg = run(lambda u, v, c: fs_bn(u, *rf, v, c, training, 0.1, EPS, act, slope), [leaf(x), leaf(w), leaf(b)],
                  dy, backend)
    eager, ge = run(lambda u, v, c: torch_bn(u, *rt, v, c, training, 0.1, EPS, act, slope),
                    [leaf(x), leaf(w), leaf(b)], dy)
    if training:
        assert torch.isnan(eager[:, 0]).all() and torch.isfinite(eager[:, 1]).all()
    tag = f"[{backend}] {mode} {act}"
    assert_same_nonfinite(got, eager, f"{tag} y", atol=1e-5)
    xf = x.nan_to_num(0.0, 0.0, 0.0)
    _, sdx, sdw, sdb = cond_scales(xf, rm, rv, w, b, dy, training, act, slope)
    for name, g, e, sc in zip(("dx", "dweight", "dbias"), gg, ge, (sdx, sdw, sdb)):
        sc = sc.max().item() if isinstance(sc, torch.Tensor) else sc
        assert_same_nonfinite(g, e, f"{tag} {name}", atol=1e-5 * sc)
    for name, g, e in zip(("running_mean", "running_var"), rf, rt):
        # non-finite where torch's is (torch's +inf running_mean may be a NaN here: a Welford mean of
        # +inf values is inf - inf), finite and equal elsewhere
        fin = torch.isfinite(e)
        assert torch.equal(torch.isfinite(g), fin), f"{tag} {name}: finite at {torch.isfinite(g)}, torch's at {fin}"
        torch.testing.assert_close(g[fin], e[fin], rtol=1e-5, atol=1e-5, msg=lambda m: f"{tag} {name}: {m}")


EMPTY = [(0, 6, 3, 4), (0, 6), (0, 4, 5), (2, 6, 0), (2, 6, 0, 4), (0, 3, 2, 2, 2)]


@pytest.mark.parametrize("act,slope", [(None, 0.01), ("silu", 0.01)], ids=["none", "silu"])
@pytest.mark.parametrize("shape", EMPTY, ids=["N0-2d", "N0-NC", "N0-1d", "L0", "H0", "N0-3d"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_empty(backend, act, slope, shape, mode, device):
    """No values (empty batch, empty spatial dims): torch's empty output and dx, zero dweight/dbias
    (sums over no values), and in training the running statistics unchanged (as torch on CPU)."""
    training = mode == "train"
    x = torch.randn(shape, device=device)
    C = shape[1]
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    rm, rv = 0.3 * torch.randn(C, device=device), 0.5 + torch.rand(C, device=device)
    dy = torch.randn(shape, device=device)
    rf = (_clone(rm), _clone(rv))
    got, gg = run(lambda u, v, c: fs_bn(u, *rf, v, c, training, 0.1, EPS, act, slope), [leaf(x), leaf(w), leaf(b)],
                  dy, backend)
    eager, ge = run(lambda u, v, c: torch_bn(u, _clone(rm), _clone(rv), v, c, training, 0.1, EPS, act, slope),
                    [leaf(x), leaf(w), leaf(b)], dy)
    assert got.shape == eager.shape and got.dtype == eager.dtype
    for name, g, e in zip(("dx", "dweight", "dbias"), gg, ge):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        if name != "dx":
            e = torch.zeros_like(e)
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda s: f"{name}: {s}")
    assert torch.equal(rf[0], rm) and torch.equal(rf[1], rv), "an empty batch changed the running statistics"


def test_module_empty_batch(backend):
    """The module on an empty batch in training: running statistics unchanged, num_batches_tracked
    counts the step (as torch's module)."""
    fs, t, _ = _module_pair("BatchNorm2d", 3, act="silu")
    x = torch.randn(0, 3, 4, 4)
    with fusedstab.use_backend(backend):
        y = fs(x)
    yt = t(x)
    assert y.shape == yt.shape
    for (n, bf), (_, bt) in zip(fs.named_buffers(), t.named_buffers()):
        assert torch.equal(bf, bt), n


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
@pytest.mark.parametrize("shape", [(16, 4, 9, 9), (2, 3, 40, 41)], ids=["many-samples", "big-spatial"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(backend, fmt, shape, device):
    """Two runs give bitwise identical y, dx, dweight, dbias and running statistics (no atomics;
    fixed reduction order)."""
    if _interp(backend, device) and (fmt == "channels_last") != (shape[0] == 16):
        pytest.skip("interpreter time: many samples in channels_last (several tiles of positions), big spatial "
                    "in NCHW (several tiles per channel)")
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x, w, b, rm, rv = make(shape, device, torch.float32, memory_format=mf)
    dy = torch.randn(shape, device=device)
    outs = []
    for _ in range(2):
        r = (_clone(rm), _clone(rv))
        outs.append((run(lambda u, v, c: fs_bn(u, *r, v, c, True, 0.1, EPS, "silu"), [leaf(x), leaf(w), leaf(b)],
                         dy, backend), r))
    ((o1, g1), r1), ((o2, g2), r2) = outs
    assert torch.equal(o1, o2)
    for name, a, c in zip(("dx", "dweight", "dbias", "running_mean", "running_var"), (*g1, *r1), (*g2, *r2)):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


# ============================================================================= reference, signature
@pytest.mark.parametrize("act,slope", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_torch_float64(act, slope, mode):
    x, w, b, rm, rv = make((3, 6, 3, 4), "cpu", torch.float64)
    training = mode == "train"
    for ww, bb in ((w, b), (None, None)):
        r1, r2 = (_clone(rm), _clone(rv)), (_clone(rm), _clone(rv))
        got = reference.batch_norm(x, *r1, ww, bb, training, 0.1, EPS, act, slope)
        exp = torch_bn(x, *r2, ww, bb, training, 0.1, EPS, act, slope)
        torch.testing.assert_close(got, exp, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(r1, r2, rtol=1e-13, atol=1e-13)


def test_functional_signature():
    """torch's positional arguments in torch's order and defaults, then activation, negative_slope."""
    fs_params = list(inspect.signature(FS.batch_norm).parameters.values())
    t_params = list(inspect.signature(F.batch_norm).parameters.values())
    for i, p in enumerate(t_params):
        q = fs_params[i]
        assert q.name == p.name, f"argument {i}: {q.name!r} != torch's {p.name!r}"
        assert q.default == p.default, p.name
    names = [q.name for q in fs_params]
    assert names[len(t_params):] == ["activation", "negative_slope"], names
    assert fs_params[len(t_params)].default is None and fs_params[len(t_params) + 1].default == 0.01


# ============================================================================= gradcheck
_CL = torch.channels_last
# (id, shape, memory format, training, activation, slope, affine)
GRADCHECK = [("train-none", (3, 4, 2, 2), None, True, None, 0.01, (True, True)),
             ("train-cl-silu", (3, 4, 2, 2), _CL, True, "silu", 0.01, (True, True)),
             ("train-NC-leaky-0.1", (5, 3), None, True, "leaky_relu", -0.1, (True, True)),
             ("train-1d-silu-plain", (2, 3, 3), None, True, "silu", 0.01, (False, False)),
             ("eval-cl-leaky0.2", (2, 4, 2, 2), _CL, False, "leaky_relu", 0.2, (True, True)),
             ("eval-NC-silu-weight-only", (3, 5), None, False, "silu", 0.01, (True, False))]
TORCH_BACKEND_ONLY_ON_CPU = ("train-none", "train-1d-silu-plain")


@pytest.mark.parametrize("gid,shape,mf,training,act,slope,affine", GRADCHECK, ids=[g[0] for g in GRADCHECK])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(backend, gid, shape, mf, training, act, slope, affine, device):
    if backend == "triton" and device == "cpu" and gid in TORCH_BACKEND_ONLY_ON_CPU:
        pytest.skip("interpreter time: the triton kernels' paths are gradchecked by the other cases")
    x, w, b, rm, rv = make(shape, device, torch.float64, affine=affine, memory_format=mf)
    if act == "leaky_relu":  # keep the pre-activation off the kink for the finite differences
        assert preact64(x, rm, rv, w, b, training).abs().min() > 1e-3
    given = [t for t in (x, w, b) if t is not None]
    inputs = [t.detach().requires_grad_() for t in given]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        # training: running statistics updated on every call (clones), gradients unaffected
        return fs_bn(xx, _clone(rm), _clone(rv), ww, bb, training, 0.1, EPS, act, slope)

    with fusedstab.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradcheck_full(backend):
    """The full (not fast-mode) Jacobian on one tiny case, training without running statistics."""
    if _interp(backend):
        pytest.skip("interpreter time: the triton kernels are gradchecked in fast mode (test_gradcheck)")
    x, w, b, _, _ = make((2, 2, 2), "cpu", torch.float64)
    inputs = [t.detach().requires_grad_() for t in (x, w, b)]
    with fusedstab.use_backend(backend):
        assert torch.autograd.gradcheck(lambda u, v, c: fs_bn(u, None, None, v, c, True, 0.1, EPS, "silu"), inputs,
                                        eps=1e-6, atol=1e-6, rtol=1e-5)


# ============================================================================= custom ops
def _op_x(kind):
    """3-D (N, C, S) views of the kinds the functional hands the ops."""
    if kind == "nchw":
        return torch.randn(3, 5, 7, device=DEV) * 2 + 0.5
    if kind == "channels_last":  # (N, C, H*W) of a channels_last tensor: strides (C*S, 1, C)
        x = torch.randn(3, 5, 2, 4, device=DEV) * 2 + 0.5
        return x.contiguous(memory_format=torch.channels_last).flatten(2)
    if kind == "NC":  # (N, C) as (N, C, 1)
        return (torch.randn(6, 5, device=DEV) * 2 + 0.5)[:, :, None]
    if kind == "fp16":
        return (torch.randn(3, 4, 5, device=DEV) * 2 + 0.5).half()
    if kind == "fp16_channels_last":
        x = (torch.randn(2, 4, 3, 3, device=DEV) * 2 + 0.5).half()
        return x.contiguous(memory_format=torch.channels_last).flatten(2)
    if kind == "fp64":
        return torch.randn(2, 6, 5, device=DEV, dtype=torch.float64)
    if kind == "empty":
        return torch.randn(0, 5, 4, device=DEV)
    raise ValueError(kind)


# (id, x kind, has weight, has bias, weight dtype (None: x's), activation, slope, training)
OP_CASES = [
    ("nchw-silu-train", "nchw", True, True, None, "silu", 0.01, True),
    ("cl-relu-eval", "channels_last", True, True, None, "relu", 0.01, False),
    ("cl-leaky-0.1-train", "channels_last", True, True, None, "leaky_relu", -0.1, True),
    ("NC-none-plain-train", "NC", False, False, None, "none", 0.01, True),
    ("fp16-fp32w-leaky0.2-train", "fp16", True, True, torch.float32, "leaky_relu", 0.2, True),
    ("fp16-cl-fp32w-silu-eval", "fp16_channels_last", True, True, torch.float32, "silu", 0.01, False),
    ("fp64-bias-only-silu-train", "fp64", False, True, None, "silu", 0.01, True),
    ("empty", "empty", True, True, None, "silu", 0.01, True),
]
# opcheck runs each op many times: a subset (test_op_outputs takes them all); both layouts
OPCHECK_CASES = [c for c in OP_CASES if c[0] in ("nchw-silu-train", "cl-relu-eval", "fp16-fp32w-leaky0.2-train")]


def _op_args(case):
    """x, weight, bias, mean, rstd (float64 statistics in the accumulation dtype: the batch's in
    training, running-like ones in eval), activation, slope, training, dy, coef (or None)."""
    _, kind, hw, hb, wdt, act, slope, training = case
    x = _op_x(kind)
    C = x.shape[1]
    acc = reference.acc_dtype(x.dtype)
    w = (1 + 0.5 * torch.randn(C, device=DEV)).to(wdt or x.dtype) if hw else None
    b = (0.5 * torch.randn(C, device=DEV)).to(wdt or x.dtype) if hb else None
    if training and x.numel():
        mean, rstd, _ = float64_stats(x, None, None, True)
    else:
        mean, rstd = 0.3 * torch.randn(C, device=DEV).double(), torch.rsqrt(0.5 + torch.rand(C, device=DEV).double())
    mean, rstd = mean.to(acc), rstd.to(acc)
    dy = torch.randn(x.shape, device=DEV).to(x.dtype)
    return x, w, b, mean, rstd, act, slope, training, dy


def _truth_sums(x, w, b, mean, rstd, act, slope, dy):
    """float64: z, xhat, dz = dy * act'(z), sums (2, C) = (sum dz, sum dz * xhat)."""
    C = x.shape[1]
    xd = x.double()
    xhat = (xd - mean.double()[:, None]) * rstd.double()[:, None]
    wd = torch.ones(C, dtype=torch.float64, device=x.device) if w is None else w.double()
    bd = torch.zeros(C, dtype=torch.float64, device=x.device) if b is None else b.double()
    z = (wd[:, None] * xhat + bd[:, None]).requires_grad_()
    (dz,) = torch.autograd.grad(act_fn(z, None if act == "none" else act, slope), z, dy.double())
    return z.detach(), xhat, dz, torch.stack([dz.sum((0, 2)), (dz * xhat).sum((0, 2))]), wd


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_stats(case, op_backend):
    x = _op_args(case)[0]
    torch.library.opcheck(OPS.batch_norm_stats, (x,))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_elemt(case, op_backend):
    x, w, b, mean, rstd, act, slope, _, _ = _op_args(case)
    torch.library.opcheck(OPS.batch_norm_elemt, (x, w, b, mean, rstd, act, slope))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_bwd_reduce(case, op_backend):
    x, w, b, mean, rstd, act, slope, _, dy = _op_args(case)
    torch.library.opcheck(OPS.batch_norm_bwd_reduce, (dy, x, w, b, mean, rstd, act, slope))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_bwd_elemt(case, op_backend):
    x, w, b, mean, rstd, act, slope, training, dy = _op_args(case)
    coef = None
    if training:
        count = x.shape[0] * x.shape[2]
        coef = (_truth_sums(x, w, b, mean, rstd, act, slope, dy)[3] / count).to(mean.dtype)
    torch.library.opcheck(OPS.batch_norm_bwd_elemt, (dy, x, w, b, mean, rstd, coef, act, slope))


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_outputs(case, op_backend):
    """stats: (3, C) in the accumulation dtype, (count, mean, M2); elemt: y like x (x's strides);
    bwd_reduce: (2, C) accumulation dtype (sum dz, sum dz * xhat); bwd_elemt: dx like x, with coef
    (training) and without (eval). Values against float64."""
    x, w, b, mean, rstd, act, slope, training, dy = _op_args(case)
    N, C, S = x.shape
    acc = reference.acc_dtype(x.dtype)
    low = x.dtype == torch.float16
    tol = 1e-12 if x.dtype == torch.float64 else 1e-5

    stats = OPS.batch_norm_stats(x)
    assert stats.shape == (3, C) and stats.dtype == acc and stats.device == x.device
    if x.numel():
        xc = x.double().transpose(0, 1).reshape(C, -1)
        m64 = xc.mean(1)
        assert torch.equal(stats[0].double(), torch.full((C,), float(N * S), dtype=torch.float64, device=x.device))
        torch.testing.assert_close(stats[1].double(), m64, rtol=tol, atol=tol * xc.abs().max().item())
        torch.testing.assert_close(stats[2].double(), (xc - m64[:, None]).square().sum(1), rtol=tol, atol=tol)
    else:
        assert (stats[0] == 0).all() and (stats[2] == 0).all()

    y = OPS.batch_norm_elemt(x, w, b, mean, rstd, act, slope)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert same_layout(y, x), f"y strides {y.stride()} != x's {x.stride()}"
    z, xhat, dz, sums64, wd = _truth_sums(x, w, b, mean, rstd, act, slope, dy)
    if x.numel():
        exp = act_fn(z, None if act == "none" else act, slope)
        torch.testing.assert_close(y.double(), exp, rtol=1e-3 if low else tol, atol=1e-3 if low else tol)

    sums = OPS.batch_norm_bwd_reduce(dy, x, w, b, mean, rstd, act, slope)
    assert sums.shape == (2, C) and sums.dtype == acc and sums.device == x.device
    scale = max(1.0, (dy.double().abs() * (xhat.abs() + 1)).sum((0, 2)).max().item()) if x.numel() else 1.0
    torch.testing.assert_close(sums.double(), sums64, rtol=tol, atol=tol * scale)

    coef = (sums64 / max(N * S, 1)).to(acc) if training else None
    dx = OPS.batch_norm_bwd_elemt(dy, x, w, b, mean, rstd, coef, act, slope)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    if x.numel():
        c = torch.zeros(2, C, dtype=torch.float64, device=x.device) if coef is None else coef.double()
        exp = (wd * rstd.double())[:, None] * (dz - c[0][:, None] - xhat * c[1][:, None])
        sdx = max(1.0, (wd * rstd.double()).abs().max().item() * (dz.abs().max().item() + 1))
        torch.testing.assert_close(dx.double(), exp, rtol=1e-3 if low else tol, atol=(1e-3 if low else tol) * sdx)


# ============================================================================= torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _chain(x, rm, rv, w, b):
    """Two batch norms in one graph (channels_last in): training with running statistics and silu,
    then training without them and leaky_relu; then an eval one on the updated statistics."""
    y = FS.batch_norm(x, rm, rv, w, b, True, 0.1, EPS, activation="silu")
    y = FS.batch_norm(y * 2, None, None, None, None, True, 0.1, 1e-3, activation="leaky_relu", negative_slope=-0.1)
    y = FS.batch_norm(y, rm, rv, w, None, False, 0.1, EPS, activation="relu")
    return y + 1


def _torch_chain(x, rm, rv, w, b):
    y = F.silu(F.batch_norm(x, rm, rv, w, b, True, 0.1, EPS))
    y = F.leaky_relu(F.batch_norm(y * 2, None, None, None, None, True, 0.1, 1e-3), -0.1)
    y = F.relu(F.batch_norm(y, rm, rv, w, None, False, 0.1, EPS))
    return y + 1


def _run_fn(fn, leaves, buffers, seed=1):
    """Output, gradients of the leaves, and the buffers (clones, updated by the call)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    buffers = [t.detach().clone() for t in buffers]
    out = fn(leaves[0], *buffers, *leaves[1:])
    g = torch.Generator(device=DEV).manual_seed(seed)
    (out * torch.randn(out.shape, generator=g, device=DEV, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves], buffers


def _chain_inputs():
    x = (torch.randn(3, 6, 4, 5, device=DEV) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    leaves = [x, 1 + 0.5 * torch.randn(6, device=DEV), 0.5 * torch.randn(6, device=DEV)]
    buffers = [0.3 * torch.randn(6, device=DEV), 0.5 + torch.rand(6, device=DEV)]
    return leaves, buffers


def _assert_same_results(a, b):
    torch.testing.assert_close(a[0], b[0])
    for u, v in zip(a[1], b[1]):
        torch.testing.assert_close(u, v)
    for u, v in zip(a[2], b[2]):
        torch.testing.assert_close(u, v)


def test_compile_fullgraph_aot_eager_parity(op_backend, fresh_dynamo):
    """fullgraph capture, the custom ops in the forward and backward graphs, the same outputs,
    gradients and updated running statistics as eager fusedstab and as torch."""
    be, graphs = graph_recorder()
    leaves, buffers = _chain_inputs()
    eager = _run_fn(_chain, leaves, buffers)
    compiled = _run_fn(torch.compile(_chain, backend=be, fullgraph=True), leaves, buffers)
    _assert_same_results(compiled, eager)
    assert compiled[0].is_contiguous(memory_format=torch.channels_last)
    for got, orig in zip(compiled[2], buffers):
        assert not torch.equal(got, orig), "running statistics not updated under torch.compile"
    fw = {str(n.target) for gm in graphs["fw"] for n in gm.graph.nodes if n.op == "call_function"}
    bw = {str(n.target) for gm in graphs["bw"] for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("batch_norm_stats", "batch_norm_elemt"):
        assert any(f"fusedstab.{op}" in t for t in fw), (op, fw)
    for op in ("batch_norm_bwd_reduce", "batch_norm_bwd_elemt"):
        assert any(f"fusedstab.{op}" in t for t in bw), (op, bw)
    assert not any("native_batch_norm" in t or "_batch_norm" in t.replace("fusedstab.batch_norm", "")
                   for t in fw | bw), fw | bw
    ref = _run_fn(_torch_chain, leaves, buffers)
    _assert_same_results(compiled, ref)


def test_compile_plain_aot_eager(fresh_dynamo):
    """The plain torch.compile(fullgraph=True, backend="aot_eager") call, as a user writes it."""
    leaves, buffers = _chain_inputs()
    compiled = _run_fn(torch.compile(_chain, backend="aot_eager", fullgraph=True), leaves, buffers)
    ref = _run_fn(_torch_chain, leaves, buffers)
    _assert_same_results(compiled, ref)


def test_compile_module(fresh_dynamo):
    """A compiled BatchNorm2d module: two training steps then eval, the same outputs, gradients,
    running statistics and num_batches_tracked as the eager module (and torch's)."""
    m = fnn.BatchNorm2d(6, activation="silu", device=DEV)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    m_c, m_t = copy.deepcopy(m), torch.nn.BatchNorm2d(6, device=DEV)
    m_t.load_state_dict(m.state_dict())
    cm = torch.compile(m_c, backend="aot_eager", fullgraph=True)
    for step in range(3):
        if step == 2:
            for mod in (m, m_c, m_t):
                mod.eval()
        x = torch.randn(3, 6, 4, 5, device=DEV) * (1 + step) + step
        outs = []
        for fn, params in ((m, m.parameters()), (cm, m_c.parameters()),
                           (lambda u: F.silu(m_t(u)), m_t.parameters())):
            xl = leaf(x)
            y = fn(xl)
            gs = torch.autograd.grad(y, [xl, *params], torch.ones_like(y) * 0.5)
            outs.append((y.detach(), gs))
        for got in outs[1:]:
            torch.testing.assert_close(got[0], outs[0][0])
            for a, e in zip(got[1], outs[0][1]):
                torch.testing.assert_close(a, e)
        for mod in (m_c, m_t):
            for (n, a), (_, e) in zip(mod.named_buffers(), m.named_buffers()):
                torch.testing.assert_close(a, e, msg=lambda s: f"step {step} {n}: {s}")
    assert m_c.num_batches_tracked.item() == 2


# ============================================================================= nn modules
MODULES = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
IN_SHAPES = {"BatchNorm1d": (4, 6, 3), "BatchNorm2d": (2, 6, 3, 4), "BatchNorm3d": (2, 6, 2, 3, 2)}


@pytest.mark.parametrize("name", MODULES)
def test_module_is_torch_subclass_and_signature(name):
    fs_cls, t_cls = getattr(fnn, name), getattr(torch.nn, name)
    assert issubclass(fs_cls, t_cls)
    fs_params = inspect.signature(fs_cls).parameters
    t_sig = inspect.signature(t_cls).parameters
    for pname, p in t_sig.items():
        assert pname in fs_params, f"torch.nn.{name}'s argument {pname!r} missing"
        q = fs_params[pname]
        assert q.default == p.default, pname
        if p.kind != p.KEYWORD_ONLY:
            assert q.kind == p.kind, pname
            assert list(fs_params).index(pname) == list(t_sig).index(pname), f"{pname} not at torch's position"
    assert fs_params["activation"].default is None and fs_params["negative_slope"].default == 0.01
    assert fs_params["activation"].kind == inspect.Parameter.KEYWORD_ONLY
    assert fs_params["bias"].default is True


# (args, kwargs) valid for both torch.nn.BatchNorm*d and fusedstab.nn.BatchNorm*d
MODULE_CONFIGS = [((6,), {}), ((6, 1e-3, 0.2), {}), ((6,), {"affine": False}),
                  ((6,), {"track_running_stats": False}), ((6,), {"momentum": None}), ((6,), {"bias": False}),
                  ((6, 1e-5, 0.1, True, True), {})]
MODULE_IDS = ["default", "eps-momentum", "no-affine", "no-running-stats", "momentum-None", "no-bias", "positional"]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("args,kwargs", MODULE_CONFIGS, ids=MODULE_IDS)
def test_module_attributes_params_buffers_repr(name, args, kwargs):
    fs, t = getattr(fnn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs)
    assert repr(fs) == repr(t)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(fs, attr) == getattr(t, attr), attr
    assert [(n, p.shape, p.dtype, p.requires_grad) for n, p in fs.named_parameters()] == \
           [(n, p.shape, p.dtype, p.requires_grad) for n, p in t.named_parameters()]
    assert [(n, b.shape, b.dtype) for n, b in fs.named_buffers()] == \
           [(n, b.shape, b.dtype) for n, b in t.named_buffers()]
    for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(fs, n) is None) == (getattr(t, n) is None), n
    sd_fs, sd_t = fs.state_dict(), t.state_dict()
    assert list(sd_fs) == list(sd_t)
    for k in sd_t:  # the init: weight ones, bias zeros, running 0 / 1, 0 batches
        assert torch.equal(sd_fs[k], sd_t[k]), k


@pytest.mark.parametrize("act,slope,needles", [("silu", 0.01, ["activation='silu'"]),
                                               ("relu", 0.01, ["activation='relu'"]),
                                               ("leaky_relu", 0.2, ["activation='leaky_relu'", "negative_slope=0.2"])])
def test_module_repr_with_activation(act, slope, needles):
    fs = fnn.BatchNorm2d(6, activation=act, negative_slope=slope)
    base = repr(torch.nn.BatchNorm2d(6))
    r = repr(fs)
    assert r.startswith(base[:-1]) and all(n in r for n in needles), r
    assert list(fs.state_dict()) == list(torch.nn.BatchNorm2d(6).state_dict())


def test_module_defaults():
    m = fnn.BatchNorm2d(4)
    assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == (4, 1e-5, 0.1, True, True)
    assert m.activation is None and m.negative_slope == 0.01
    assert torch.equal(m.weight, torch.ones(4)) and torch.equal(m.bias, torch.zeros(4))
    assert torch.equal(m.running_mean, torch.zeros(4)) and torch.equal(m.running_var, torch.ones(4))
    assert m.num_batches_tracked.dtype == torch.long and m.num_batches_tracked.item() == 0
    assert m.weight.dtype == torch.get_default_dtype() and m.training
    x = torch.randn(3, 4, 5, 2)
    torch.testing.assert_close(m(x), F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True))


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("args,kwargs", MODULE_CONFIGS, ids=MODULE_IDS)
@pytest.mark.parametrize("act", [None, "silu"])
def test_module_load_state_dict_both_ways(name, args, kwargs, act):
    """torch -> fusedstab and fusedstab -> torch, after two training steps (running statistics and
    num_batches_tracked moved); then both give the same eval (and, without running statistics, batch)
    output. Forward-only on the torch backend: the numerics are tested above."""
    shape = IN_SHAPES[name]
    t = getattr(torch.nn, name)(*args, **kwargs)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
        for _ in range(2):
            t(torch.randn(shape) * 2 + 1)
    fs = getattr(fnn, name)(*args, **kwargs, activation=act)
    fs.load_state_dict(t.state_dict(), strict=True)
    for k, v in t.state_dict().items():
        assert torch.equal(fs.state_dict()[k], v), k
    fs2 = getattr(fnn, name)(*args, **kwargs, activation=act)
    with torch.no_grad(), fusedstab.use_backend("torch"):
        for p in fs2.parameters():
            p.normal_()
        for _ in range(3):
            fs2(torch.randn(shape) * 2 + 1)
    t2 = getattr(torch.nn, name)(*args, **kwargs)
    t2.load_state_dict(fs2.state_dict(), strict=True)
    for k, v in fs2.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v), k
    for m in (t, fs, t2, fs2):
        m.eval()
    x = torch.randn(shape)
    with torch.no_grad(), fusedstab.use_backend("torch"):
        torch.testing.assert_close(fs(x), act_fn(t(x), act))
        torch.testing.assert_close(fs2(x), act_fn(t2(x), act))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.float16), ("meta", torch.float32),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", MODULES)
def test_module_factory_kwargs(device, dtype, name):
    m = getattr(fnn, name)(6, device=device, dtype=dtype, activation="silu")
    t = getattr(torch.nn, name)(6, device=device, dtype=dtype)
    assert [(p.device, p.dtype) for p in m.parameters()] == [(p.device, p.dtype) for p in t.parameters()]
    assert [(n, b.device, b.dtype) for n, b in m.named_buffers()] == \
           [(n, b.device, b.dtype) for n, b in t.named_buffers()]
    if device == "meta":  # the fake functions serve meta tensors
        for training in (True, False):
            m.train(training)
            x = torch.empty(IN_SHAPES[name], device="meta", dtype=dtype)
            y = m(x)
            assert (y.device.type, y.shape, y.dtype) == ("meta", x.shape, dtype)


def test_module_fp16_parameters(backend):
    """A module built with dtype=float16 (parameters and running statistics in fp16) on fp16 input."""
    fs, t, t64 = _module_pair("BatchNorm1d", 5, act="silu")
    fs.half(), t.half()
    t64.load_state_dict(t.state_dict())
    x = (torch.randn(4, 5, 6) * 2 + 0.5).half()
    dy = torch.randn(4, 5, 6).half()
    _module_step(fs, t, t64, x, dy, backend, f"[{backend}] fp16 module")


# ============================================================================= bad input
_X = lambda: torch.randn(2, 3, 4)  # noqa: E731
_RM = lambda n=3, dt=torch.float32: torch.zeros(n, dtype=dt)  # noqa: E731
_RV = lambda n=3, dt=torch.float32: torch.ones(n, dtype=dt)  # noqa: E731
# (id, call(f)), f = F.batch_norm or fusedstab's: (input, running_mean, running_var, weight, bias,
# training, momentum, eps)
BAD = [
    ("one-value-per-channel-NC", lambda f: f(torch.randn(1, 3), _RM(), _RV(), None, None, True)),
    ("one-value-per-channel-NCL", lambda f: f(torch.randn(1, 3, 1), _RM(), _RV(), None, None, True)),
    ("one-value-per-channel-no-stats", lambda f: f(torch.randn(1, 3, 1, 1), None, None, None, None, True)),
    ("eval-without-running-mean", lambda f: f(_X(), None, None, None, None, False)),
    ("running-mean-only", lambda f: f(_X(), _RM(), None, None, None, True)),
    ("running-var-only", lambda f: f(_X(), None, _RV(), None, None, True)),
    ("running-var-only-eval", lambda f: f(_X(), None, _RV(), None, None, False)),
    ("running-mean-only-eval", lambda f: f(_X(), _RM(), None, None, None, False)),
    ("running-mean-wrong-size", lambda f: f(_X(), _RM(4), _RV(), None, None, True)),
    ("running-mean-wrong-size-eval", lambda f: f(_X(), _RM(4), _RV(), None, None, False)),
    ("running-var-wrong-size", lambda f: f(_X(), _RM(), _RV(2), None, None, True)),
    ("weight-wrong-size", lambda f: f(_X(), _RM(), _RV(), torch.ones(4), None, True)),
    ("weight-wrong-size-no-stats", lambda f: f(_X(), None, None, torch.ones(4), None, True)),
    ("bias-wrong-size", lambda f: f(_X(), _RM(), _RV(), torch.ones(3), torch.ones(2), True)),
    ("bias-only-wrong-size-eval", lambda f: f(_X(), _RM(), _RV(), None, torch.ones(5), False)),
    ("int64-input", lambda f: f(torch.ones(2, 3, 4, dtype=torch.int64), _RM(), _RV(), None, None, True)),
    ("int32-input-eval", lambda f: f(torch.ones(2, 3, 4, dtype=torch.int32), _RM(), _RV(), None, None, False)),
    ("int64-input-no-stats", lambda f: f(torch.ones(2, 3, 4, dtype=torch.int64), None, None, None, None, True)),
    ("bool-input", lambda f: f(torch.ones(2, 3, 4, dtype=torch.bool), _RM(), _RV(), None, None, True)),
    ("fp32-x-fp16-weight", lambda f: f(_X(), _RM(), _RV(), torch.ones(3).half(), None, True)),
    ("fp32-x-fp64-weight", lambda f: f(_X(), _RM(), _RV(), torch.ones(3).double(), None, True)),
    ("fp32-x-fp64-stats", lambda f: f(_X(), _RM(dt=torch.float64), _RV(dt=torch.float64), None, None, True)),
    ("fp32-x-fp16-stats-eval", lambda f: f(_X(), _RM(dt=torch.float16), _RV(dt=torch.float16), None, None, False)),
    ("fp64-x-fp32-params", lambda f: f(_X().double(), _RM(), _RV(), torch.ones(3), torch.zeros(3), True)),
    ("fp16-x-fp32-weight-fp16-stats", lambda f: f(_X().half(), _RM(dt=torch.float16), _RV(dt=torch.float16),
                                                  torch.ones(3), torch.zeros(3), True)),
    ("fp16-x-fp16-weight-fp32-stats", lambda f: f(_X().half(), _RM(), _RV(), torch.ones(3).half(),
                                                  torch.zeros(3).half(), True)),
    ("eps-zero-training", lambda f: f(_X(), _RM(), _RV(), None, None, True, 0.1, 0.0)),
    ("eps-negative-training", lambda f: f(_X(), _RM(), _RV(), None, None, True, 0.1, -1e-5)),
    ("eps-zero-training-no-stats", lambda f: f(_X(), None, None, None, None, True, 0.1, 0.0)),
    ("eps-negative-eval", lambda f: f(_X(), _RM(), _RV(), None, None, False, 0.1, -1e-5)),
    ("momentum-None-training", lambda f: f(_X(), _RM(), _RV(), None, None, True, None)),
    ("momentum-None-eval", lambda f: f(_X(), _RM(), _RV(), None, None, False, None)),
    ("input-1d", lambda f: f(torch.randn(3), _RM(), _RV(), None, None, True)),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_like_torch(case):
    _, call = case
    assert_raises_like_torch(lambda: call(F.batch_norm), lambda: call(FS.batch_norm))


@pytest.mark.parametrize("case,match", [
    ("one-value-per-channel-NC", re.escape("Expected more than 1 value per channel when training, got input size")),
    ("eval-without-running-mean", "running_mean must be defined in evaluation mode"),
    ("running-mean-only", "running_mean and running_var must either both be None or neither be None"),
    ("running-mean-wrong-size", "running_mean should contain 3 elements not 4"),
    ("running-var-wrong-size", "running_var should contain 3 elements not 2"),
    ("weight-wrong-size", "weight should contain 3 elements not 4"),
    ("bias-wrong-size", "bias should contain 3 elements not 2"),
    ("eps-zero-training", "eps must be positive"),
])
def test_bad_input_messages(case, match):
    """The messages the spec names (torch's own)."""
    call = dict(BAD)[case]
    with pytest.raises(Exception, match=match):
        call(FS.batch_norm)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 3, 0)], ids=str)
def test_empty_input_gives_an_empty_result_as_torch(shape, training, stats):
    """F.batch_norm takes empty inputs, a 1-D (0,) one (no channels) included, with or without
    running statistics even in eval."""
    C = shape[1] if len(shape) > 1 else 0
    rm, rv = (torch.zeros(C), torch.ones(C)) if stats else (None, None)
    want = F.batch_norm(torch.randn(shape), rm, rv, training=training)
    got = FS.batch_norm(torch.randn(shape), rm, rv, training=training)
    assert got.shape == want.shape == shape and got.dtype == want.dtype


@pytest.mark.parametrize("act", ("gelu", "ReLU", "none_", "tanh", ""))
def test_unknown_activation_raises_value_error(act):
    x = _X()
    with pytest.raises(ValueError, match="activation"):
        fs_bn(x, _RM(), _RV(), None, None, True, 0.1, EPS, act)
    with pytest.raises(ValueError, match="activation"):
        fnn.BatchNorm1d(3, activation=act)(x)


@pytest.mark.parametrize("name,bad", [("BatchNorm1d", (2, 3, 4, 5)), ("BatchNorm1d", (3,)),
                                      ("BatchNorm2d", (2, 3, 4)), ("BatchNorm2d", (2, 3, 4, 4, 4)),
                                      ("BatchNorm3d", (2, 3, 4, 4)), ("BatchNorm3d", (2, 3))],
                         ids=["1d-got-4d", "1d-got-1d", "2d-got-3d", "2d-got-5d", "3d-got-4d", "3d-got-2d"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_module_check_input_dim_like_torch(name, bad, act):
    fs, t = getattr(fnn, name)(3, activation=act), getattr(torch.nn, name)(3)
    x = torch.randn(bad)
    with pytest.raises(ValueError) as t_info:
        t(x)
    assert_raises_like_torch(lambda: t(x), lambda: fs(x), match=re.escape(str(t_info.value)))


def test_module_bad_input_raises_like_torch():
    fs, t = fnn.BatchNorm2d(3, activation="silu"), torch.nn.BatchNorm2d(3)
    for bad in (torch.randn(2, 4, 3, 3), torch.randn(1, 3, 1, 1), torch.ones(2, 3, 2, 2, dtype=torch.int64)):
        assert_raises_like_torch(lambda: t(bad), lambda: fs(bad))
    fs.eval(), t.eval()
    assert_raises_like_torch(lambda: t(torch.randn(2, 5, 3, 3)), lambda: fs(torch.randn(2, 5, 3, 3)))


@pytest.mark.gpu
def test_device_mismatch_raises_like_torch():
    x = torch.randn(2, 3, 4, device="cuda")
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    for args in ((rm, rv, torch.ones(3)), (rm.cpu(), rv.cpu(), None)):
        assert_raises_like_torch(lambda: F.batch_norm(x, *args, training=True),
                                 lambda: FS.batch_norm(x, *args, training=True))


# ============================================================================= GPU: a ResNet-like shape
@pytest.mark.gpu
@pytest.mark.parametrize("act", [None, "relu"])
def test_resnet_shape_channels_last(act):
    """A ResNet stage BatchNorm: 32x256x56x56, channels_last, fp16 and bf16 input with fp32
    parameters and running statistics: values, gradients and running statistics against float64."""
    for dt in (torch.float16, torch.bfloat16):
        x, w, b, rm, rv = make((32, 256, 56, 56), "cuda", dt, wdtype=torch.float32, memory_format=torch.channels_last)
        got, _, _ = compare("triton", x, w, b, rm, rv, True, 0.1, act, tag=f"resnet {dt}")
        assert got.is_contiguous(memory_format=torch.channels_last)
        del got
        torch.cuda.empty_cache()

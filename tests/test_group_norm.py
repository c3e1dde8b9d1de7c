"""GroupNorm (+ fused activation): ``fusedstab.functional.group_norm(input, num_groups, weight, bias,
eps, activation, negative_slope)`` and ``fusedstab.nn.GroupNorm``.

Every result is compared with a float64 truth (``torch.nn.functional.group_norm`` and the activation
on float64 copies of the very same inputs) and with eager torch in the test dtype (the same calls), by
the per-dtype rule in ``helpers`` (fp32/fp64 tight, relative to each result's conditioning scale;
fp16/bf16 at most 2x torch's own error). Numerics run on both the ``triton`` backend (on CPU through
the Triton interpreter) and the ``torch`` backend; tests parametrized on device also run on CUDA under
the ``gpu`` mark, where bf16 is checked too.

Then the API: the custom ops' contracts (opcheck, outputs), torch.compile(fullgraph=True), gradcheck,
the ``nn.GroupNorm`` drop-in for ``torch.nn.GroupNorm``, and the errors torch raises for bad input.
Shapes stay small: the interpreter is slow.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import fusedstab
import fusedstab.nn as fnn
from fusedstab import functional as FS
from fusedstab import reference

from helpers import (DEVICES, act_fn, act_grad_bound, assert_matches, assert_raises_like_torch, assert_same_nonfinite,
                     device_dtypes, graph_recorder, keeps_layout, leaf, run, same_layout)

OPS = torch.ops.fusedstab
EPS = 1e-5
# API tests (custom ops, compile) run where the triton backend runs: CUDA if there is a GPU, else CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (activation, negative_slope): slope matters for leaky_relu only (0 < s < 1, and a negative one).
ACTS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.1),
        ("silu", 0.01)]
ACT_IDS = ["none", "relu", "leaky0.01", "leaky0.2", "leaky-0.1", "silu"]


# ----------------------------------------------------------------------------- calling the ops
def torch_gn(x, G, w, b, eps=EPS, activation=None, slope=0.01):
    """Eager torch: F.group_norm then the activation. Where torch has no kernel for the dtype mix
    (e.g. an fp32 weight with a bf16 input on some devices) torch runs on the inputs upcast to their
    common dtype and the result is rounded once to the input's dtype. A bias without a weight runs
    with a weight of ones: torch's own backward fails there ("tensor does not have a device")."""
    if w is None and b is not None:
        w = torch.ones(x.shape[1], dtype=b.dtype, device=b.device)
    try:
        y = F.group_norm(x, G, w, b, eps)
    except RuntimeError:
        up = x.dtype
        for t in (w, b):
            up = up if t is None else torch.promote_types(up, t.dtype)
        y = F.group_norm(x.to(up), G, None if w is None else w.to(up), None if b is None else b.to(up), eps)
        return act_fn(y, activation, slope).to(x.dtype)
    return act_fn(y, activation, slope)


def fs_gn(x, G, w, b, eps=EPS, activation=None, slope=0.01):
    return FS.group_norm(x, G, w, b, eps, activation=activation, negative_slope=slope)


def float64_stats(x, G, eps=EPS):
    """(mean, rstd, k) per (n, group) in float64 from x's values; k = 1 + |mean| * rstd is the
    conditioning of the centring (groups of nearly equal values lose digits to the subtraction)."""
    N, C = x.shape[:2]
    xg = x.detach().double().reshape(N, G, -1)
    mean = xg.mean(-1)
    var = (xg - mean[..., None]).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    return mean, rstd, 1 + mean.abs() * rstd


def cond_scales(x, G, w, b, dy, activation, slope, eps=EPS):
    """Conditioning scales (the size of the terms each result is computed from), in float64:

    - y: per group, k * max(1, max |w * xhat| + |b|) * max|act'|: the pre-activation is a
      normalized value whose rounding is relative to k;
    - dx: per group, rstd * max |w * dy| * max|act'| * k: dx is a difference of terms of that size;
    - dweight / dbias: per channel, the sums over (batch, spatial) of |dy| * max|act'| * (|xhat| + k)
      and |dy| * max|act'| * k: sums of many terms, each as accurate as its own size.

    Shaped to broadcast: y and dx like x, dweight and dbias (C,)."""
    N, C = x.shape[:2]
    if x.numel() == 0:
        return 1.0, 1.0, 1.0, 1.0
    with torch.no_grad():
        mean, rstd, k = float64_stats(x, G, eps)
        cg = C // G
        xg = x.detach().double().reshape(N, G, -1)
        xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(N, C, -1)
        wd = torch.ones(C, dtype=torch.float64, device=x.device) if w is None else w.detach().double()
        bd = torch.zeros(C, dtype=torch.float64, device=x.device) if b is None else b.detach().double()
        a = act_grad_bound(activation, slope)
        kc = k.repeat_interleave(cg, dim=1)[..., None]  # (N, C, 1)
        rc = rstd.repeat_interleave(cg, dim=1)[..., None]
        z_terms = (wd[:, None] * xhat).abs() + bd.abs()[:, None]  # (N, C, S)
        zmax = z_terms.reshape(N, G, -1).amax(-1).clamp(min=1.0).repeat_interleave(cg, dim=1)[..., None]
        sy = (kc * zmax * a).expand(N, C, xhat.shape[-1])
        wdy = (dy.detach().double().reshape(N, C, -1) * wd[:, None]).abs()
        wdy_max = wdy.reshape(N, G, -1).amax(-1).repeat_interleave(cg, dim=1)[..., None]
        sdx = (rc * wdy_max * a * kc).clamp(min=1.0).expand(N, C, xhat.shape[-1])
        ady = dy.detach().double().reshape(N, C, -1).abs() * a
        sdw = (ady * (xhat.abs() + kc)).sum((0, 2)).clamp(min=1.0)
        sdb = (ady * kc).sum((0, 2)).clamp(min=1.0)
        return sy.reshape(x.shape), sdx.reshape(x.shape), sdw, sdb


def preact64(x, G, w, b, eps=EPS):
    """The float64 pre-activation z = group_norm(x) (for the kink check of relu / leaky_relu)."""
    return F.group_norm(x.detach().double(), G, None if w is None else w.detach().double(),
                        None if b is None else b.detach().double(), eps)


def compare(backend, x, G, w, b, activation=None, slope=0.01, eps=EPS, dy=None, tag="", grads=(True, True, True)):
    """fusedstab under ``backend`` vs the float64 truth vs eager torch: the output (values, dtype,
    shape, and x's memory format where it is contiguous or channels_last(_3d), else contiguous), and
    the gradients of x, weight and bias (those given and requiring grad: ``grads``)."""
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    if activation in ("relu", "leaky_relu") and x.numel():
        z = preact64(x, G, w, b, eps)
        zs = max(1.0, z.abs().max().item())
        # finite-precision pre-activations this close to the kink would take the other branch
        assert z.abs().min().item() > 1e-5 * zs, "inputs too close to the activation's kink; change them"
    lv = lambda dt=None: [leaf(t, dt, r) for t, r in zip((x, w, b), grads)]  # noqa: E731
    got, gg = run(lambda u, v, c: fs_gn(u, G, v, c, eps, activation, slope), lv(), dy, backend)
    eager, ge = run(lambda u, v, c: torch_gn(u, G, v, c, eps, activation, slope), lv(), dy)
    truth, gt = run(lambda u, v, c: torch_gn(u, G, v, c, eps, activation, slope), lv(torch.float64), dy.double())
    tag = (f"{tag} [{backend}] act={activation}{f'({slope})' if activation == 'leaky_relu' else ''} "
           f"G={G} x{tuple(x.shape)} {x.dtype}" + ("" if w is None else f" w {w.dtype}"))
    sy, sdx, sdw, sdb = cond_scales(x, G, w, b, dy, activation, slope, eps)
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
    return got, gg


def make(shape, G, device, dtype, wdtype=None, affine=(True, True), memory_format=None):
    """x (mean 0.5, std 2: a little centring to do), weight ~ 1 + 0.5 N(0, 1), bias ~ 0.5 N(0, 1)."""
    C = shape[1]
    x = torch.randn(shape, device=device) * 2 + 0.5
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x = x.to(dtype)
    w = (1 + 0.5 * torch.randn(C, device=device)).to(wdtype or dtype) if affine[0] else None
    b = (0.5 * torch.randn(C, device=device)).to(wdtype or dtype) if affine[1] else None
    return x, w, b


# ============================================================================= values and gradients
# (id, shape, num_groups)
SHAPES = [
    ("NC", (2, 6), 3),                   # no spatial dims
    ("NC-1ch-per-group", (2, 5), 5),     # groups of one element
    ("C1", (2, 1, 5), 1),                # one channel, one group, 1-D
    ("1d-C15-G5", (2, 15, 3), 5),
    ("batch1-2d", (1, 6, 4, 5), 3),
    ("1x1", (3, 4, 1, 1), 2),
    ("5x7-C6-G3", (2, 6, 5, 7), 3),
    ("C7-G7", (1, 7, 3, 2), 7),          # one channel per group
    ("G1", (2, 5, 3, 3), 1),             # one group: LayerNorm over (C, H, W)
    ("3d", (2, 6, 2, 3, 4), 3),
    ("big-group", (2, 4, 33, 65), 2),   # 4290 elements a group, not a power of two
]


FP64_INTERPRETER_SKIP = ("batch1-2d", "1x1", "G1", "5x7-C6-G3", "C1")


@pytest.mark.parametrize("sid,shape,G", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_values_and_grads(backend, sid, shape, G, device, dtype):
    if dtype == torch.float64 and device == "cpu" and backend == "triton" and sid in FP64_INTERPRETER_SKIP:
        pytest.skip("interpreter time: fp64 kernels are checked on the other shapes")
    x, w, b = make(shape, G, device, dtype)
    compare(backend, x, G, w, b, tag=sid)


@pytest.mark.parametrize("act,slope", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_activations(backend, act, slope, device, dtype):
    """Each activation fused, forward and backward (NCHW channels_last; other shapes and layouts below)."""
    if dtype == torch.float64 and device == "cpu" and backend == "triton" and act == "leaky_relu" and slope > 0:
        pytest.skip("interpreter time: fp64 leaky_relu is checked with the negative slope")
    x, w, b = make((2, 6, 5, 7), 3, device, dtype, memory_format=torch.channels_last)
    got, _ = compare(backend, x, 3, w, b, act, slope, tag="act channels_last")
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("sid,shape,G", [s for s in SHAPES if s[0] in ("NC", "C1", "3d", "NC-1ch-per-group")],
                         ids=["NC", "NC-1ch-per-group", "C1", "3d"])
def test_activation_shapes(backend, sid, shape, G):
    """The activation (silu) on the odd shapes too (fp32)."""
    act, slope = "silu", 0.01
    x, w, b = make(shape, G, "cpu", torch.float32)
    compare(backend, x, G, w, b, act, slope, tag=sid)


@pytest.mark.parametrize("act", ("relu", "silu"))
def test_negative_slope_ignored_unless_leaky(backend, act):
    x, w, b = make((2, 6, 3, 4), 3, "cpu", torch.float32)
    with fusedstab.use_backend(backend):
        a = fs_gn(x, 3, w, b, EPS, act, 0.01)
        c = fs_gn(x, 3, w, b, EPS, act, 0.37)
    assert torch.equal(a, c)


@pytest.mark.parametrize("eps", (1e-3, 0.5))
def test_eps(backend, eps):
    """A non-default eps (small inputs, so that eps matters) is used as torch uses it."""
    x, w, b = make((2, 6, 3, 4), 3, "cpu", torch.float32)
    x = x * 0.05
    compare(backend, x, 3, w, b, "silu", eps=eps, tag=f"eps={eps}")
    with fusedstab.use_backend(backend):
        y = fs_gn(x, 3, w, b, eps)
    assert not torch.allclose(y, F.group_norm(x, 3, w, b, EPS), rtol=1e-2, atol=1e-2)


AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("affine", AFFINE, ids=["affine", "weight_only", "bias_only", "no_affine"])
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.bfloat16)))
def test_weight_bias_none(backend, affine, device, dtype):
    """Each of weight and bias may be None (then no gradient for it), with the activation after."""
    act, slope = "leaky_relu", -0.1
    x, w, b = make((2, 6, 4, 3), 3, device, dtype, affine=affine)
    _, (dx, dw, db) = compare(backend, x, 3, w, b, act, slope, tag=f"affine={affine}")
    assert (dw is None) == (w is None) and (db is None) == (b is None)


@pytest.mark.parametrize("which", ("x", "weight", "bias"))
def test_requires_grad_subsets(backend, which):
    """Only one input requires grad: its gradient is right, the others get none."""
    x, w, b = make((2, 6, 4, 3), 3, "cpu", torch.float32)
    flags = tuple(n == which for n in ("x", "weight", "bias"))
    _, gs = compare(backend, x, 3, w, b, "silu", grads=flags, tag=f"only {which}")
    assert [g is not None for g in gs] == list(flags)


def test_no_grad(backend):
    """Inference: no graph, the same values."""
    x, w, b = make((2, 6, 4, 3), 3, "cpu", torch.float32)
    with fusedstab.use_backend(backend):
        y = fs_gn(x, 3, w, b, EPS, "silu")
        with torch.no_grad():
            y2 = fs_gn(leaf(x), 3, leaf(w), leaf(b), EPS, "silu")
    assert y.grad_fn is None and y2.grad_fn is None
    assert torch.equal(y, y2)


# (device, x dtype, weight/bias dtype): torch.nn.functional.group_norm takes fp16/bf16 input with
# fp32 parameters (mixed precision): output and dx in the input's dtype, dweight/dbias in fp32.
MIXED = [
    pytest.param("cpu", torch.float16, torch.float32, id="cpu-fp16x-fp32w"),
    pytest.param("cuda", torch.float16, torch.float32, id="cuda-fp16x-fp32w", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, torch.float32, id="cuda-bf16x-fp32w", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("act,slope", [(None, 0.01), ("silu", 0.01)], ids=["none", "silu"])
@pytest.mark.parametrize("device,xdt,wdt", MIXED)
def test_mixed_dtype(backend, act, slope, device, xdt, wdt):
    for shape, mf in (((2, 6, 5, 7), None), ((2, 6, 5, 7), torch.channels_last), ((3, 10, 4), None)):
        x, w, b = make(shape, 2, device, xdt, wdtype=wdt, memory_format=mf)
        got, (dx, dw, db) = compare(backend, x, 2, w, b, act, slope, tag=f"mixed {mf}")
        assert got.dtype == xdt and dx.dtype == xdt and dw.dtype == wdt and db.dtype == wdt


def test_mixed_dtype_torch_refuses():
    """What torch does with a weight wider than fp32 or narrower than the input (CPU): check
    fusedstab raises the same type, or else gives the value of the computation upcast."""
    x = torch.randn(2, 6, 3, 4)
    for xd, wd in ((torch.float32, torch.float16), (torch.float32, torch.float64), (torch.float64, torch.float32)):
        xx, w, b = x.to(xd), torch.randn(6).to(wd), torch.randn(6).to(wd)
        with pytest.raises(RuntimeError):
            F.group_norm(xx, 3, w, b)
        try:
            got = fs_gn(xx, 3, w, b)
        except RuntimeError:
            continue
        up = torch.promote_types(xd, wd)
        exp = F.group_norm(xx.to(up), 3, w.to(up), b.to(up)).to(got.dtype)
        torch.testing.assert_close(got, exp)


# ----------------------------------------------------------------------------- memory formats
def _layout(kind, device, dtype):
    """(x, G): an input in the given memory layout."""
    if kind == "contiguous":
        return torch.randn(2, 6, 5, 7, device=device).to(dtype), 3
    if kind == "channels_last":
        return torch.randn(2, 6, 5, 7, device=device).contiguous(memory_format=torch.channels_last).to(dtype), 3
    if kind == "channels_last_3d":
        x = torch.randn(2, 6, 3, 2, 5, device=device).contiguous(memory_format=torch.channels_last_3d)
        return x.to(dtype), 2
    if kind == "nchw_crop":  # a spatial crop of an NCHW tensor: not dense
        return torch.randn(2, 6, 6, 9, device=device).to(dtype)[:, :, 1:4, 2:7], 3
    if kind == "channels_last_channel_slice":  # channels 1..6 of a channels_last tensor: not dense
        x = torch.randn(2, 8, 4, 5, device=device).contiguous(memory_format=torch.channels_last).to(dtype)
        return x[:, 1:7], 3
    if kind == "every_other_L":  # (N, C, L) with L stride 2
        return torch.randn(3, 6, 14, device=device).to(dtype)[:, :, ::2], 2
    if kind == "batch_slice":  # every other sample
        return torch.randn(4, 6, 3, 4, device=device).to(dtype)[::2], 3
    if kind == "permuted_dense":  # dense but (N, C, L) stored as (L, N, C): not a kept layout
        return torch.randn(5, 2, 6, device=device).to(dtype).permute(1, 2, 0), 3
    if kind == "transposed_NC":  # (N, C) column-major
        return torch.randn(6, 4, device=device).to(dtype).t(), 2
    if kind == "expanded_batch":  # batch stride 0
        return torch.randn(1, 6, 3, 4, device=device).to(dtype).expand(3, 6, 3, 4), 3
    raise ValueError(kind)


LAYOUTS = ["contiguous", "channels_last", "channels_last_3d", "nchw_crop", "channels_last_channel_slice",
           "every_other_L", "batch_slice", "permuted_dense", "transposed_NC", "expanded_batch"]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32,), (torch.float32, torch.bfloat16)))
def test_memory_formats(backend, kind, device, dtype):
    """Output in x's memory format (contiguous, channels_last, channels_last_3d), contiguous for any
    other layout; right values and gradients for all (with silu after: the activation reads and
    writes through the same strides; no activation is the same path with ACT=none)."""
    act, slope = "silu", 0.01
    x, G = _layout(kind, device, dtype)
    C = x.shape[1]
    w = (1 + 0.5 * torch.randn(C, device=device)).to(dtype)
    b = (0.5 * torch.randn(C, device=device)).to(dtype)
    got, _ = compare(backend, x, G, w, b, act, slope, tag=kind)
    if kind == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    if kind == "channels_last_3d":
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
    if kind in ("nchw_crop", "channels_last_channel_slice", "every_other_L", "batch_slice", "permuted_dense",
                "transposed_NC", "expanded_batch", "contiguous"):
        assert got.is_contiguous()


@pytest.mark.parametrize("x_fmt,dy_fmt", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                          ("channels_last", "strided")])
def test_upstream_gradient_layout_differs(backend, x_fmt, dy_fmt):
    """The upstream gradient in another layout than x (what a following conv hands back)."""
    mf = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    x, w, b = make((2, 6, 5, 7), 3, "cpu", torch.float32, memory_format=mf[x_fmt])
    if dy_fmt == "strided":
        dy = torch.randn(2, 6, 10, 7)[:, :, ::2]
    else:
        dy = torch.randn(2, 6, 5, 7).contiguous(memory_format=mf[dy_fmt])
    compare(backend, x, 3, w, b, "silu", dy=dy, tag=f"x {x_fmt}, dy {dy_fmt}")


@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
def test_expanded_upstream_gradient(backend, fmt):
    """y.sum().backward(): the upstream gradient is an expanded scalar (all strides 0)."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x, w, b = make((2, 6, 3, 4), 3, "cpu", torch.float32, memory_format=mf)
    dy = torch.ones(()).expand(x.shape)
    _, grads = compare(backend, x, 3, w, b, "leaky_relu", 0.2, dy=dy, tag="expanded dy")
    xl, wl, bl = leaf(x), leaf(w), leaf(b)
    with fusedstab.use_backend(backend):
        fs_gn(xl, 3, wl, bl, EPS, "leaky_relu", 0.2).sum().backward()
    for t, g in zip((xl, wl, bl), grads):
        assert torch.equal(t.grad, g)


@pytest.mark.parametrize("kind", ("every_other", "expanded"))
def test_strided_weight_and_bias(backend, kind):
    """Weight and bias that are non-contiguous views (torch accepts any strides)."""
    x = torch.randn(2, 6, 3, 4)
    if kind == "every_other":
        w, b = (1 + 0.5 * torch.randn(12))[::2], (0.5 * torch.randn(18))[::3]
    else:
        w, b = torch.tensor(1.5).expand(6), torch.tensor(-0.25).expand(6)
    assert not w.is_contiguous()
    grads = (True, kind != "expanded", kind != "expanded")
    compare(backend, x, 3, w, b, "silu", tag=f"{kind} weight/bias", grads=grads)


# ----------------------------------------------------------------------------- special inputs
def _constant_groups(dtype, device):
    """(3, 6, 4, 5) with 3 groups: groups of 0, 3.0, -0.5, 0.1 (inexact in binary) and 1e4, the rest random."""
    x = torch.randn(3, 6, 4, 5, device=device) * 2 + 0.5
    consts = {(0, 0): 0.0, (0, 1): 3.0, (1, 0): -0.5, (1, 2): 0.1, (2, 1): 1e4}
    for (n, g), c in consts.items():
        x[n, 2 * g: 2 * g + 2] = c
    return x.to(dtype), consts


@pytest.mark.parametrize("act,slope", [(None, 0.01), ("silu", 0.01)], ids=["none", "silu"])
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.float16, torch.bfloat16)))
def test_constant_groups(backend, act, slope, device, dtype):
    """Groups whose elements are all equal: zero variance, rstd = 1/sqrt(eps), output act(bias) (or
    act(0)); finite values and gradients equal to torch's."""
    x, consts = _constant_groups(dtype, device)
    w = (1 + 0.5 * torch.randn(6, device=device)).to(dtype)
    b = (0.5 * torch.randn(6, device=device)).to(dtype)
    got, grads = compare(backend, x, 3, w, b, act, slope, tag="constant groups")
    for t in (got, *grads):
        assert torch.isfinite(t).all()
    exp_b = act_fn(b.double(), act, slope)
    for (n, g), _ in consts.items():
        torch.testing.assert_close(got[n, 2 * g: 2 * g + 2].double(),
                                   exp_b[2 * g: 2 * g + 2, None, None].expand(2, 4, 5),
                                   rtol=0 if dtype == torch.float32 else torch.finfo(dtype).eps, atol=1e-5)
    # the statistics of the op: mean = the constant, rstd = 1/sqrt(eps)
    with fusedstab.use_backend(backend):
        _, mean, rstd = OPS.group_norm_fwd(x.reshape(3, 6, 20), w, b, 3, EPS, act or "none", slope)
    for (n, g), c in consts.items():
        assert rstd[n, g].item() == pytest.approx(1 / math.sqrt(EPS), rel=1e-5)
        assert mean[n, g].item() == pytest.approx(float(torch.tensor(c).to(dtype)), rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("act,slope", [(None, 0.01), ("silu", 0.01)], ids=["none", "silu"])
@pytest.mark.parametrize("shape,G", [((3, 2), 2), ((4, 3), 1), ((2, 1, 1, 1), 1)], ids=["NC-G=C", "NC-C3G1", "1x1x1x1"])
def test_single_element_groups(backend, act, slope, shape, G):
    """Groups of one element (and N x 1 x 1 x 1): xhat = 0 exactly, y = act(bias), dx = 0."""
    x, w, b = make(shape, G, "cpu", torch.float32)
    got, (dx, dw, db) = compare(backend, x, G, w, b, act, slope, tag="one element")
    if math.prod(shape[1:]) // G == 1:
        torch.testing.assert_close(got, act_fn(b, act, slope).view(1, -1, *[1] * (x.dim() - 2)).expand_as(got))
        assert (dx == 0).all()


def _nonfinite_groups(device):
    """(3, 6, 4, 5), 3 groups: a NaN in group (0, 0), +inf in (1, 1), +inf and -inf in (2, 2)."""
    x = torch.randn(3, 6, 4, 5, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[2, 4, 1, 1] = float("inf")
    x[2, 5, 3, 4] = float("-inf")
    return x


NONFINITE_CASES = [(a, s, "contiguous") for a, s in ACTS if s != 0.01 or a != "leaky_relu"] + [
    ("relu", 0.01, "channels_last"), ("silu", 0.01, "channels_last")]


@pytest.mark.parametrize("act,slope,fmt", NONFINITE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_propagate_like_torch(backend, act, slope, fmt, device):
    """NaN/Inf in a group: torch's NaN/Inf pattern in y, dx, dweight, dbias (the whole group NaN;
    dbias finite where torch's is, e.g. relu passes the gradient of a NaN pre-activation as torch's
    threshold_backward does); other groups finite and equal to torch's."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = _nonfinite_groups(device).contiguous(memory_format=mf)
    w = 1 + 0.5 * torch.randn(6, device=device)
    b = 0.5 * torch.randn(6, device=device)
    dy = torch.randn(x.shape, device=device)
    got, gg = run(lambda u, v, c: fs_gn(u, 3, v, c, EPS, act, slope), [leaf(x), leaf(w), leaf(b)], dy, backend)
    eager, ge = run(lambda u, v, c: torch_gn(u, 3, v, c, EPS, act, slope), [leaf(x), leaf(w), leaf(b)], dy)
    assert torch.isnan(eager[0, :2]).all() and torch.isfinite(eager[0, 2:]).all()
    assert_same_nonfinite(got, eager, f"[{backend}] {act} y", atol=1e-5)
    xf = x.nan_to_num(0.0, 0.0, 0.0)
    _, sdx, sdw, sdb = cond_scales(xf, 3, w, b, dy, act, slope)
    for name, g, e, sc in zip(("dx", "dweight", "dbias"), gg, ge, (sdx, sdw, sdb)):
        sc = sc.max().item() if isinstance(sc, torch.Tensor) else sc
        assert_same_nonfinite(g, e, f"[{backend}] {act} {name}", atol=1e-5 * sc)


EMPTY = [((0, 6, 3, 4), 3), ((0, 6), 2), ((2, 6, 0, 4), 3), ((0, 4, 5), 4), ((2, 0, 3), 1)]


@pytest.mark.parametrize("act,slope", [(None, 0.01), ("silu", 0.01)], ids=["none", "silu"])
@pytest.mark.parametrize("shape,G", EMPTY, ids=["N0-2d", "N0-NC", "HW0", "N0-1d", "C0"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty(backend, act, slope, shape, G, device):
    """No elements (empty batch, empty spatial dims, no channels): torch's empty output and dx, and
    zero dweight/dbias (sums over no elements; torch gives NaN dweight for empty spatial dims)."""
    x = torch.randn(shape, device=device)
    C = shape[1]
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    dy = torch.randn(shape, device=device)
    got, gg = run(lambda u, v, c: fs_gn(u, G, v, c, EPS, act, slope), [leaf(x), leaf(w), leaf(b)], dy, backend)
    eager, ge = run(lambda u, v, c: torch_gn(u, G, v, c, EPS, act, slope), [leaf(x), leaf(w), leaf(b)], dy)
    assert got.shape == eager.shape and got.dtype == eager.dtype
    for name, g, e in zip(("dx", "dweight", "dbias"), gg, ge):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        if name != "dx":
            e = torch.zeros_like(e)
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("where", ("first", "middle", "last"))
@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
def test_group_with_an_outlier(backend, where, fmt):
    """One large value (1000) in each group of otherwise N(0, 1) values (a hot pixel, a padded
    border): the statistics stay accurate to fp32 wherever in the group it sits. k = 1 + |mean| *
    rstd is ~1 here, so the tight fp32 tolerance applies in full (torch's fp32 passes)."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 4, 24, 24)
    for n in range(2):
        for g in range(2):
            v = x[n, 2 * g: 2 * g + 2].view(-1)  # the group in NCHW order
            v[{"first": 0, "middle": v.numel() // 2 + 3, "last": -1}[where]] = 1000.0
    x = x.contiguous(memory_format=mf)
    w, b = 1 + 0.5 * torch.randn(4), 0.5 * torch.randn(4)
    compare(backend, x, 2, w, b, tag=f"outlier {where} {fmt}")


@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
def test_large_offset_keeps_precision(backend, fmt):
    """fp32 groups of mean 1e4 and std 1: the variance (rstd) keeps fp32 precision. An fp32 mean near
    1e4 is off by ~1e-3, which an uncentred Chan update multiplies into M2 (~1e-5 relative here)."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = (torch.randn(2, 16, 40, 40) + 1e4).contiguous(memory_format=mf)  # groups of several tiles
    with fusedstab.use_backend(backend):
        _, mean, rstd = OPS.group_norm_fwd(x.flatten(2), None, None, 2, EPS, "none", 0.01)
    xg = x.double().reshape(2, 2, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xg.var(-1, unbiased=False) + EPS), rtol=2e-6, atol=0)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
@pytest.mark.parametrize("shape,G", [((6, 4, 5, 5), 2), ((2, 4, 40, 41), 1)], ids=["many-samples", "big-groups"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(backend, fmt, shape, G, device):
    """Two runs give bitwise identical y, dx, dweight, dbias (no atomics; fixed reduction order)."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x, w, b = make(shape, G, device, torch.float32, memory_format=mf)
    dy = torch.randn(shape, device=device)
    (o1, g1), (o2, g2) = [run(lambda u, v, c: fs_gn(u, G, v, c, EPS, "silu"), [leaf(x), leaf(w), leaf(b)], dy,
                              backend) for _ in range(2)]
    assert torch.equal(o1, o2)
    for name, a, c in zip(("dx", "dweight", "dbias"), g1, g2):
        assert torch.equal(a, c), f"{name} differs between two identical backward runs"


# ============================================================================= reference, autograd.Function
@pytest.mark.parametrize("act,slope", ACTS, ids=ACT_IDS)
def test_reference_matches_torch_float64(act, slope):
    x, w, b = make((2, 6, 3, 4), 3, "cpu", torch.float64)
    for ww, bb in ((w, b), (None, None)):
        got = reference.group_norm(x, 3, ww, bb, EPS, act, slope)
        torch.testing.assert_close(got, torch_gn(x, 3, ww, bb, EPS, act, slope), rtol=1e-13, atol=1e-13)
    assert reference.group_norm(x, 3).dtype == torch.float64


def test_autograd_function_apply(backend):
    """GroupNormFunction.apply(input, num_groups, weight, bias, eps, activation, negative_slope), with
    the activation as a string ("none" for none): what the functional computes."""
    x, w, b = make((2, 6, 3, 4), 3, "cpu", torch.float32)
    with fusedstab.use_backend(backend):
        for act, slope in ((None, 0.01), ("leaky_relu", -0.1), ("silu", 0.01)):
            a = fusedstab.autograd.GroupNormFunction.apply(x, 3, w, b, EPS, act or "none", slope)
            torch.testing.assert_close(a, fs_gn(x, 3, w, b, EPS, act, slope), rtol=0, atol=0)
        xl, wl, bl = leaf(x), leaf(w), leaf(b)
        fusedstab.autograd.GroupNormFunction.apply(xl, 3, wl, bl, EPS, "silu", 0.01).sum().backward()
    xt, wt, bt = leaf(x), leaf(w), leaf(b)
    torch_gn(xt, 3, wt, bt, EPS, "silu").sum().backward()
    for a, t in ((xl, xt), (wl, wt), (bl, bt)):
        torch.testing.assert_close(a.grad, t.grad)


# ============================================================================= gradcheck
_CL = torch.channels_last
# (id, shape, num_groups, memory format, activation, slope, affine)
GRADCHECK = [("2d-none", (2, 6, 2, 3), 3, None, None, 0.01, (True, True)),
             ("2d-leaky-0.1", (2, 6, 2, 3), 3, None, "leaky_relu", -0.1, (True, True)),
             ("cl-silu", (2, 6, 2, 3), 3, _CL, "silu", 0.01, (True, True)),
             ("cl-none-plain", (2, 6, 2, 3), 3, _CL, None, 0.01, (False, False)),
             ("NC-silu", (3, 4), 2, None, "silu", 0.01, (True, True)),
             ("1d-1ch-group-leaky0.2", (2, 3, 4), 3, None, "leaky_relu", 0.2, (True, True)),
             ("2d-silu-plain", (2, 6, 2, 3), 3, None, "silu", 0.01, (False, False))]
TORCH_BACKEND_ONLY_ON_CPU = ("2d-none", "cl-none-plain", "1d-1ch-group-leaky0.2")


@pytest.mark.parametrize("gid,shape,G,mf,act,slope,affine", GRADCHECK, ids=[g[0] for g in GRADCHECK])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(backend, gid, shape, G, mf, act, slope, affine, device):
    if backend == "triton" and device == "cpu" and gid in TORCH_BACKEND_ONLY_ON_CPU:
        pytest.skip("interpreter time: the triton kernels' paths are gradchecked by the other cases")
    x, w, b = make(shape, G, device, torch.float64, affine=affine, memory_format=mf)
    if act == "leaky_relu":  # keep the pre-activation off the kink for the finite differences
        assert preact64(x, G, w, b).abs().min() > 1e-3
    inputs = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*args):
        xx, ww, bb = (args[0], args[1], args[2]) if affine[0] else (args[0], None, None)
        return fs_gn(xx, G, ww, bb, EPS, act, slope)

    with fusedstab.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradcheck_full(backend):
    """The full (not fast-mode) Jacobian on one tiny case."""
    x, w, b = make((1, 4, 2), 2, "cpu", torch.float64)
    inputs = [t.detach().requires_grad_() for t in (x, w, b)]
    with fusedstab.use_backend(backend):
        assert torch.autograd.gradcheck(lambda u, v, c: fs_gn(u, 2, v, c, EPS, "silu"), inputs,
                                        eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradgradcheck_or_clear_error(backend):
    """Double backward: either right or a clear error, never silently wrong."""
    x, w, b = make((1, 2, 3), 1, "cpu", torch.float64)
    inputs = [t.detach().requires_grad_() for t in (x, w, b)]
    with fusedstab.use_backend(backend):
        try:
            ok = torch.autograd.gradgradcheck(lambda u, v, c: fs_gn(u, 1, v, c, EPS, "silu"), inputs,
                                              eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
        except RuntimeError as e:
            assert str(e)
            return
    assert ok


# ============================================================================= custom ops
def _op_x(kind):
    """3-D (N, C, S) views of the kinds the functional hands the op."""
    if kind == "contiguous":
        return torch.randn(2, 6, 12, device=DEV)
    if kind == "channels_last_view":  # (N, C, H*W) of a channels_last tensor: strides (C*S, 1, C)
        return torch.randn(2, 6, 3, 4, device=DEV).contiguous(memory_format=torch.channels_last).flatten(2)
    if kind == "fp16":
        return torch.randn(3, 4, 5, device=DEV).half()
    if kind == "fp64":
        return torch.randn(2, 6, 5, device=DEV, dtype=torch.float64)
    if kind == "S1":
        return torch.randn(2, 6, 1, device=DEV)
    if kind == "empty":
        return torch.randn(0, 6, 5, device=DEV)
    raise ValueError(kind)


# (id, x kind, num_groups, has_weight, has_bias, weight dtype (None: x's), activation, slope)
OP_CASES = [
    ("contig-affine-silu", "contiguous", 3, True, True, None, "silu", 0.01),
    ("contig-plain", "contiguous", 2, False, False, None, "none", 0.01),
    ("cl-view-weight-only-relu", "channels_last_view", 3, True, False, None, "relu", 0.01),
    ("fp16-fp32w-leaky-0.1", "fp16", 2, True, True, torch.float32, "leaky_relu", -0.1),
    ("fp64-bias-only", "fp64", 3, False, True, None, "silu", 0.01),
    ("S1", "S1", 3, True, True, None, "none", 0.01),
    ("empty", "empty", 3, True, True, None, "silu", 0.01),
]
# opcheck runs each op many times: a subset (test_op_outputs takes them all)
OPCHECK_CASES = [c for c in OP_CASES if c[0] not in ("contig-plain", "S1")]


def _op_args(case):
    _, kind, G, hw, hb, wdt, act, slope = case
    x = _op_x(kind)
    C = x.shape[1]
    w = (1 + 0.5 * torch.randn(C, device=DEV)).to(wdt or x.dtype) if hw else None
    b = (0.5 * torch.randn(C, device=DEV)).to(wdt or x.dtype) if hb else None
    return x, w, b, G, EPS, act, slope


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_fwd(case, op_backend):
    torch.library.opcheck(OPS.group_norm_fwd, _op_args(case))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_bwd(case, op_backend):
    x, w, b, G, eps, act, slope = _op_args(case)
    y, mean, rstd = OPS.group_norm_fwd(x, w, b, G, eps, act, slope)
    dy = torch.randn(y.shape, device=DEV).to(y.dtype)
    torch.library.opcheck(OPS.group_norm_bwd, (dy, x, w, b, mean, rstd, G, act, slope))


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_outputs(case, op_backend):
    """fwd: y = empty_like(x) (x's strides) with the right values, mean/rstd (N, G) in the
    accumulation dtype; bwd: dx like x, dweight/dbias in the parameters' shape (empty when None)."""
    x, w, b, G, eps, act, slope = _op_args(case)
    N, C, S = x.shape
    y, mean, rstd = OPS.group_norm_fwd(x, w, b, G, eps, act, slope)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert same_layout(y, x), f"y strides {y.stride()} != x's {x.stride()}"
    acc = reference.acc_dtype(x.dtype)
    assert mean.shape == (N, G) and rstd.shape == (N, G) and mean.dtype == acc and rstd.dtype == acc
    if x.numel():
        m64, r64, k = float64_stats(x, G, eps)
        tol = 1e-12 if x.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(mean.double(), m64, rtol=tol, atol=tol * x.double().abs().max().item())
        torch.testing.assert_close(rstd.double(), r64, rtol=tol * k.max().item(), atol=0)
        act_ = None if act == "none" else act
        exp = torch_gn(x.double(), G, None if w is None else w.double(), None if b is None else b.double(), eps,
                       act_, slope)
        torch.testing.assert_close(y.double(), exp, rtol=1e-3 if x.dtype == torch.float16 else 1e-5,
                                   atol=1e-3 if x.dtype == torch.float16 else 1e-5)
    dy = torch.randn(y.shape, device=DEV).to(y.dtype)
    dx, dw, db = OPS.group_norm_bwd(dy, x, w, b, mean, rstd, G, act, slope)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    for p, g in ((w, dw), (b, db)):
        if p is None:
            assert g.numel() == 0
        else:
            assert g.shape == p.shape


# ============================================================================= torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _chain(x, w, b):
    """Two group norms in one graph, the second on the first's output (channels_last in)."""
    y = FS.group_norm(x, 3, w, b, activation="silu")
    y = FS.group_norm(y * 2, 2, None, None, 1e-3, activation="leaky_relu", negative_slope=-0.1)
    return y + 1


def _torch_chain(x, w, b):
    y = F.silu(F.group_norm(x, 3, w, b))
    return F.leaky_relu(F.group_norm(y * 2, 2, None, None, 1e-3), -0.1) + 1


def _run_fn(fn, leaves, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    g = torch.Generator(device=DEV).manual_seed(seed)
    (out * torch.randn(out.shape, generator=g, device=DEV, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _chain_leaves():
    x = torch.randn(2, 6, 4, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    return [x, 1 + 0.5 * torch.randn(6, device=DEV), 0.5 * torch.randn(6, device=DEV)]


def test_compile_fullgraph_aot_eager_parity(op_backend, fresh_dynamo):
    """fullgraph capture, the custom ops in the forward and backward graphs, and the same outputs
    and gradients as eager fusedstab and as torch."""
    be, graphs = graph_recorder()
    leaves = _chain_leaves()
    eager = _run_fn(_chain, leaves)
    compiled = _run_fn(torch.compile(_chain, backend=be, fullgraph=True), leaves)
    torch.testing.assert_close(compiled[0], eager[0])
    assert compiled[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, e)
    fw = {str(n.target) for gm in graphs["fw"] for n in gm.graph.nodes if n.op == "call_function"}
    bw = {str(n.target) for gm in graphs["bw"] for n in gm.graph.nodes if n.op == "call_function"}
    assert any("fusedstab.group_norm_fwd" in t for t in fw), fw
    assert any("fusedstab.group_norm_bwd" in t for t in bw), bw
    assert not any("native_group_norm" in t for t in fw | bw), fw | bw
    ref = _run_fn(_torch_chain, leaves)
    torch.testing.assert_close(compiled[0], ref[0])
    for a, e in zip(compiled[1], ref[1]):
        torch.testing.assert_close(a, e)


def test_compile_plain_aot_eager(fresh_dynamo):
    """The plain torch.compile(fullgraph=True, backend="aot_eager") call, as a user writes it."""
    leaves = _chain_leaves()
    compiled = _run_fn(torch.compile(_chain, backend="aot_eager", fullgraph=True), leaves)
    ref = _run_fn(_torch_chain, leaves)
    torch.testing.assert_close(compiled[0], ref[0])
    for a, e in zip(compiled[1], ref[1]):
        torch.testing.assert_close(a, e)


def test_compile_module(fresh_dynamo):
    m = fnn.GroupNorm(3, 6, activation="silu", device=DEV)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, 6, 4, 5, device=DEV)
    eager = _run_fn(m, [x])
    compiled = _run_fn(torch.compile(m, backend="aot_eager", fullgraph=True), [x])
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1][0], eager[1][0])


# ============================================================================= nn module
def _randomize(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


# (args, kwargs) valid for both torch.nn.GroupNorm and fusedstab.nn.GroupNorm
MODULE_CONFIGS = [((3, 6), {}), ((1, 5), {}), ((7, 7), {"eps": 1e-3}), ((2, 6), {"affine": False}),
                  ((2, 6, 1e-5, True), {}), ((3, 6), {"bias": False})]
MODULE_IDS = ["3-6", "1-5", "7-7-eps", "2-6-noaffine", "positional", "no-bias"]


def test_module_is_torch_subclass_and_signature():
    assert issubclass(fnn.GroupNorm, torch.nn.GroupNorm)
    fs_params = inspect.signature(fnn.GroupNorm).parameters
    for name, p in inspect.signature(torch.nn.GroupNorm).parameters.items():
        assert name in fs_params, f"torch.nn.GroupNorm's argument {name!r} missing"
        q = fs_params[name]
        assert q.default == p.default, name
        if p.kind != p.KEYWORD_ONLY:
            assert q.kind == p.kind, name
    assert fs_params["activation"].default is None and fs_params["negative_slope"].default == 0.01
    for name in ("num_groups", "num_channels", "eps", "affine", "device", "dtype"):  # torch's order
        assert list(fs_params).index(name) == list(inspect.signature(torch.nn.GroupNorm).parameters).index(name)


@pytest.mark.parametrize("args,kwargs", MODULE_CONFIGS, ids=MODULE_IDS)
def test_module_attributes_params_state_dict_repr(args, kwargs):
    fs, t = fnn.GroupNorm(*args, **kwargs), torch.nn.GroupNorm(*args, **kwargs)
    assert repr(fs) == repr(t)
    for attr in ("num_groups", "num_channels", "eps", "affine"):
        assert getattr(fs, attr) == getattr(t, attr), attr
    assert [(n, p.shape, p.dtype, p.requires_grad) for n, p in fs.named_parameters()] == \
           [(n, p.shape, p.dtype, p.requires_grad) for n, p in t.named_parameters()]
    for n in ("weight", "bias"):
        assert (getattr(fs, n) is None) == (getattr(t, n) is None), n
    assert list(fs.named_buffers()) == []
    sd_fs, sd_t = fs.state_dict(), t.state_dict()
    assert list(sd_fs) == list(sd_t)
    for k in sd_t:  # the init: weight ones, bias zeros
        assert torch.equal(sd_fs[k], sd_t[k]), k


@pytest.mark.parametrize("act,slope,needle", [("silu", 0.01, "activation='silu'"), ("relu", 0.01, "activation='relu'"),
                                              ("leaky_relu", 0.2, "activation='leaky_relu'")])
def test_module_repr_with_activation(act, slope, needle):
    fs = fnn.GroupNorm(3, 6, activation=act, negative_slope=slope)
    base = repr(torch.nn.GroupNorm(3, 6))
    r = repr(fs)
    assert r.startswith(base[:-1]) and needle in r, r
    if act == "leaky_relu":
        assert "0.2" in r, f"the slope is not in the repr: {r}"
    # same parameters and state_dict as torch's
    assert list(fs.state_dict()) == list(torch.nn.GroupNorm(3, 6).state_dict())


def test_module_defaults():
    m = fnn.GroupNorm(2, 4)
    assert (m.num_groups, m.num_channels, m.eps, m.affine) == (2, 4, 1e-5, True)
    assert torch.equal(m.weight, torch.ones(4)) and torch.equal(m.bias, torch.zeros(4))
    assert m.weight.dtype == torch.get_default_dtype()
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(m(x), F.group_norm(x, 2, eps=1e-5))


@pytest.mark.parametrize("args,kwargs", MODULE_CONFIGS, ids=MODULE_IDS)
@pytest.mark.parametrize("act", [None, "silu"])
def test_module_load_state_dict_both_ways(args, kwargs, act):
    t = _randomize(torch.nn.GroupNorm(*args, **kwargs), seed=1)
    fs = fnn.GroupNorm(*args, **kwargs, activation=act)
    fs.load_state_dict(t.state_dict(), strict=True)
    for k, v in t.state_dict().items():
        assert torch.equal(fs.state_dict()[k], v)
    fs2 = _randomize(fnn.GroupNorm(*args, **kwargs, activation=act), seed=2)
    t2 = torch.nn.GroupNorm(*args, **kwargs)
    t2.load_state_dict(fs2.state_dict(), strict=True)
    for k, v in fs2.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v)
    C = fs.num_channels
    x = torch.randn(2, C, 3, 4)
    torch.testing.assert_close(fs(x), act_fn(t(x), act, 0.01))
    torch.testing.assert_close(act_fn(t2(x), act, 0.01), fs2(x))


@pytest.mark.parametrize("act,slope,fmt", [(None, 0.01, "contiguous"), ("leaky_relu", 0.2, "contiguous"),
                                           ("silu", 0.01, "channels_last")], ids=["none", "leaky", "silu-cl"])
def test_module_forward_backward_vs_torch(backend, act, slope, fmt):
    fs = _randomize(fnn.GroupNorm(3, 6, activation=act, negative_slope=slope))
    t = torch.nn.GroupNorm(3, 6)
    t.load_state_dict(fs.state_dict())
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 6, 4, 5).contiguous(memory_format=mf)
    dy = torch.randn(2, 6, 4, 5)
    xf, xt = leaf(x), leaf(x)
    with fusedstab.use_backend(backend):
        yf = fs(xf)
        yf.backward(dy)
    yt = act_fn(t(xt), act, slope)
    yt.backward(dy)
    assert yf.is_contiguous(memory_format=mf)
    torch.testing.assert_close(yf, yt)
    torch.testing.assert_close(xf.grad, xt.grad)
    for (n, pf), (_, pt) in zip(fs.named_parameters(), t.named_parameters()):
        torch.testing.assert_close(pf.grad, pt.grad, msg=lambda m: f"grad of {n}: {m}")
    fs.eval()
    with fusedstab.use_backend(backend):
        torch.testing.assert_close(fs(x), yf.detach(), rtol=0, atol=0)  # no train/eval difference


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.float16), ("meta", torch.float32),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_module_factory_kwargs(device, dtype):
    m = fnn.GroupNorm(2, 6, device=device, dtype=dtype, activation="silu")
    t = torch.nn.GroupNorm(2, 6, device=device, dtype=dtype)
    assert [(p.device, p.dtype) for p in m.parameters()] == [(p.device, p.dtype) for p in t.parameters()]
    if device == "meta":  # the fake functions serve meta tensors
        x = torch.empty(3, 6, 4, device="meta", dtype=dtype)
        y = m(x)
        assert (y.device.type, y.shape, y.dtype) == ("meta", x.shape, dtype)


# ============================================================================= bad input
_X = lambda: torch.randn(2, 6, 3, 4)  # noqa: E731
BAD = [
    ("C-not-divisible", lambda f: f(_X(), 4)),
    ("C-not-divisible-NC", lambda f: f(torch.randn(3, 5), 2)),
    ("more-groups-than-C", lambda f: f(_X(), 12)),
    ("weight-too-long", lambda f: f(_X(), 3, torch.ones(7))),
    ("weight-too-short", lambda f: f(_X(), 3, torch.ones(3))),
    ("weight-2d", lambda f: f(_X(), 3, torch.ones(1, 6))),
    ("bias-wrong-size", lambda f: f(_X(), 3, torch.ones(6), torch.ones(5))),
    ("bias-only-wrong-size", lambda f: f(_X(), 3, None, torch.ones(2))),
    ("input-1d", lambda f: f(torch.randn(6), 3)),
    ("input-0d", lambda f: f(torch.randn(()), 1)),
    ("int64-input", lambda f: f(torch.ones(2, 6, 3, dtype=torch.int64), 3)),
    ("int32-input", lambda f: f(torch.ones(2, 6, 3, dtype=torch.int32), 3)),
    ("bool-input", lambda f: f(torch.ones(2, 6, 3, dtype=torch.bool), 3)),
    ("int64-input-float-weight", lambda f: f(torch.ones(2, 6, 3, dtype=torch.int64), 3, torch.ones(6))),
    ("weight-other-device-meta", lambda f: f(_X(), 3, torch.ones(6, device="meta"))),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_like_torch(case):
    _, call = case
    assert_raises_like_torch(lambda: call(F.group_norm), lambda: call(FS.group_norm))


@pytest.mark.parametrize("act", ("gelu", "ReLU", "none_", "tanh", ""))
def test_unknown_activation_raises_value_error(act):
    with pytest.raises(ValueError, match="activation"):
        fs_gn(_X(), 3, None, None, EPS, act)
    with pytest.raises(ValueError, match="activation"):
        fnn.GroupNorm(3, 6, activation=act)(_X())


def test_module_constructor_errors_like_torch():
    assert_raises_like_torch(lambda: torch.nn.GroupNorm(4, 6), lambda: fnn.GroupNorm(4, 6))
    assert_raises_like_torch(lambda: torch.nn.GroupNorm(4, 6), lambda: fnn.GroupNorm(4, 6, activation="silu"))


def test_module_bad_input_raises_like_torch():
    fs, t = fnn.GroupNorm(3, 6), torch.nn.GroupNorm(3, 6)
    for bad in (torch.randn(2, 5, 3), torch.randn(2, 9, 3), torch.randn(6)):
        assert_raises_like_torch(lambda: t(bad), lambda: fs(bad))


@pytest.mark.gpu
def test_device_mismatch_raises_like_torch():
    x = torch.randn(2, 6, 3, device="cuda")
    for w in (torch.ones(6), torch.ones(6, dtype=torch.float16)):
        assert_raises_like_torch(lambda: F.group_norm(x, 3, w), lambda: FS.group_norm(x, 3, w))
    assert_raises_like_torch(lambda: F.group_norm(x.cpu(), 3, torch.ones(6, device="cuda")),
                               lambda: FS.group_norm(x.cpu(), 3, torch.ones(6, device="cuda")))


# ============================================================================= GPU: diffusion-like shape
@pytest.mark.gpu
@pytest.mark.parametrize("act", [None, "silu"])
def test_diffusion_shape_bf16_channels_last(act):
    """A UNet/VAE GroupNorm: 1x128x256x256, 32 groups of 4 channels (262144 elements a group),
    bf16, channels_last, fp32 and bf16 parameters: values and gradients against float64 truth."""
    for wdt in (torch.bfloat16, torch.float32):
        x, w, b = make((1, 128, 256, 256), 32, "cuda", torch.bfloat16, wdtype=wdt, memory_format=torch.channels_last)
        got, _ = compare("triton", x, 32, w, b, act, tag=f"diffusion w {wdt}")
        assert got.is_contiguous(memory_format=torch.channels_last)
        del got
        torch.cuda.empty_cache()

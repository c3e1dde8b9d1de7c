"""bias + Leaky ReLU: ``fusedstab.functional.bias_leaky_relu(x, bias, negative_slope, dim)``.

Every result is compared with a float64 truth (torch on float64 copies of the very same inputs) and
with eager torch in the test dtype (``F.leaky_relu(x + bias broadcast along dim, slope)``) by the
per-dtype rule in ``helpers`` (fp32/fp64 tight; fp16/bf16 at most 2x torch's own error). Numerics run
on both the ``triton`` backend (on CPU through the Triton interpreter) and the ``torch`` backend;
tests parametrized on device also run on CUDA under the ``gpu`` mark, where bf16 is checked too.

Then the API: the custom ops' contracts (opcheck, the packed sign mask), what autograd saves,
torch.compile(fullgraph=True), gradcheck, the ``nn.BiasLeakyReLU`` module, and the errors torch
raises for bad input.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusedstab
import fusedstab.nn as fnn
from fusedstab import backend as fs_backend
from fusedstab import functional as FS
from fusedstab import reference
from fusedstab.ops.bias_leaky_relu import memory_order_2d

from helpers import (DEVICES, assert_matches, assert_raises_like_torch, assert_same_nonfinite, device_dtypes,
                     graph_recorder, keeps_layout, leaf, leaky_relu_factor, run, same_layout)

# 0.0 is ReLU, 1.0 the identity, 1.5 > 1, -0.3 negative: backward from the packed sign mask.
SLOPES = (0.01, 0.2, 0.0, 1.0, 1.5, -0.3)
OPS = torch.ops.fusedstab
# API tests (custom ops, compile) run where the triton backend runs: CUDA if there is a GPU, else CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_ok_on_dev() -> bool:
    return DEV == "cuda" or fs_backend.triton_interpret()


# ----------------------------------------------------------------------------- calling the ops
def torch_blr(x, bias, negative_slope=0.01, dim=-1):
    """What a user writes without fusedstab: bias broadcast along ``dim``, then F.leaky_relu."""
    if bias is None:
        return F.leaky_relu(x, negative_slope)
    shape = [1] * x.dim()
    shape[dim] = x.size(dim)
    return F.leaky_relu(x + bias.view(shape), negative_slope)


def fs_blr(x, bias, negative_slope=0.01, dim=-1):
    return FS.bias_leaky_relu(x, bias, negative_slope, dim)


def _dim(x, dim):
    return dim % x.dim()


def dbias_scale(x, dy, slope, dim):
    """Conditioning of dbias (a sum over all positions but ``dim``): the largest sum of |terms|."""
    if dy.numel() == 0:
        return 1.0
    d = _dim(x, dim)
    terms = dy.double().abs() * max(1.0, abs(slope))
    other = [i for i in range(x.dim()) if i != d]
    s = terms.sum(dim=other) if other else terms
    return max(1.0, s.max().item())


def compare(backend, x, bias, slope, dim=-1, dy=None, tag="", x_grad=True, b_grad=True):
    """fusedstab under ``backend`` vs the float64 truth vs eager torch: the output (values, dtype, and
    x's layout where it is contiguous or channels_last) and the gradients of x and bias (where they require grad)."""
    out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(out_dtype)
    lv = lambda dt=None: [leaf(x, dt, x_grad), leaf(bias, dt, b_grad)]  # noqa: E731
    got, gg = run(lambda a, b: fs_blr(a, b, slope, dim), lv(), dy, backend)
    eager, ge = run(lambda a, b: torch_blr(a, b, slope, dim), lv(), dy)
    truth, gt = run(lambda a, b: torch_blr(a, b, slope, dim), lv(torch.float64), dy.double())
    tag = f"{tag} [{backend}] slope={slope} dim={dim} x{tuple(x.shape)} {x.dtype}"
    assert_matches(got, truth, eager, f"{tag} y")
    if keeps_layout(x):
        assert same_layout(got, x), f"{tag}: output strides {got.stride()} != x's {x.stride()}"
    else:
        assert got.is_contiguous(), f"{tag}: output strides {got.stride()} for x's {x.stride()}"
    names = ("dx", "dbias")
    for name, g, e, t, inp in zip(names, gg, ge, gt, (x, bias)):
        if inp is None or not inp.requires_grad and g is None and e is None:
            assert g is None and e is None
            continue
        assert g.dtype == inp.dtype, f"{tag} {name}: dtype {g.dtype} != input's {inp.dtype}"
        assert g.shape == inp.shape, f"{tag} {name}: shape {tuple(g.shape)} != input's {tuple(inp.shape)}"
        sc = dbias_scale(x, dy, slope, dim) if name == "dbias" else None
        assert_matches(g, t, e, f"{tag} {name}", scale=sc)
    return got, gg


def make(shape, device, dtype, dim=-1, bias_dtype=None, memory_format=None):
    x = torch.randn(shape, device=device)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x = x.to(dtype)
    n = shape[dim] if shape else 1
    b = (0.5 * torch.randn(n, device=device)).to(bias_dtype or dtype)
    return x, b


# ============================================================================= values and gradients
ROW_LENGTHS = (1, 3, 7, 13, 33, 1000)


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_row_lengths(backend, slope, n, device, dtype):
    """dim=-1 on (M, N), N not a multiple of 8 (the mask packs 8 columns a byte), both save paths."""
    x, b = make((5, n), device, dtype)
    compare(backend, x, b, slope, -1, tag="rows")


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_slopes(backend, slope, device, dtype):
    x, b = make((6, 37), device, dtype)
    compare(backend, x, b, slope, -1, tag="slopes")
    x, b = make((2, 3, 5, 4), device, dtype, dim=1, memory_format=torch.channels_last)
    compare(backend, x, b, slope, 1, tag="slopes NCHW channels_last")


NCHW = [(2, 5, 3, 4), (2, 3, 1, 1), (1, 1, 4, 6), (3, 4, 5, 2), (2, 3, 40, 50)]


@pytest.mark.parametrize("slope", (0.2, -0.3))
@pytest.mark.parametrize("fmt", ("contiguous", "channels_last"))
@pytest.mark.parametrize("shape", NCHW, ids=["x".join(map(str, s)) for s in NCHW])
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.bfloat16)))
def test_nchw_dim1(backend, slope, fmt, shape, device, dtype):
    """Per-channel bias on NCHW (dim=1), contiguous and channels_last: output in x's layout."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x, b = make(shape, device, dtype, dim=1, memory_format=mf)
    assert x.is_contiguous(memory_format=mf)
    got, _ = compare(backend, x, b, slope, 1, tag=fmt)
    assert got.is_contiguous(memory_format=mf)
    # and with a channels_last upstream gradient (what a following conv hands back)
    dy = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last).to(dtype)
    compare(backend, x, b, slope, 1, dy=dy, tag=f"{fmt} channels_last dy")


# (x shape, dim)
DIM_CASES = [((2, 5, 7), 1), ((2, 5, 7), -2), ((4, 6), 0), ((4, 6), -2), ((3, 2, 5), 0), ((2, 3, 4, 5), -3),
             ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3), ((2, 3, 9), -1), ((2, 3, 9), 2), ((11,), 0), ((11,), -1),
             ((1, 1, 1), 1), ((3, 1), 1)]


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("shape,dim", DIM_CASES, ids=[f"{'x'.join(map(str, s))}-dim{d}" for s, d in DIM_CASES])
def test_dims(backend, slope, shape, dim):
    """Any dim, positive or negative: (N, C, L) with dim=1, dim=0, inner dims, 1-D x."""
    x, b = make(shape, "cpu", torch.float32, dim=dim)
    compare(backend, x, b, slope, dim, tag="dims")


def _strided(kind, device, dtype):
    """(x, dim) for a non-contiguous x."""
    if kind == "transposed":  # dense, column-major: the output keeps the transposed strides
        return torch.randn(13, 6, device=device, dtype=dtype).t(), -1
    if kind == "transposed_dim0":
        return torch.randn(13, 6, device=device, dtype=dtype).t(), 0
    if kind == "row_slice":  # rows of a wider tensor
        return torch.randn(6, 20, device=device, dtype=dtype)[:, 3:16], -1
    if kind == "every_other":
        return torch.randn(6, 26, device=device, dtype=dtype)[:, ::2], -1
    if kind == "expanded_rows":  # row stride 0
        return torch.randn(1, 13, device=device, dtype=dtype).expand(6, 13), -1
    if kind == "expanded_channels":
        return torch.randn(2, 1, 3, 4, device=device, dtype=dtype).expand(2, 5, 3, 4), 1
    if kind == "nchw_slice":  # spatial crop of an NCHW tensor
        return torch.randn(2, 5, 6, 7, device=device, dtype=dtype)[:, :, 1:4, 2:6], 1
    if kind == "channels_last_slice":
        x = torch.randn(2, 8, 4, 5, device=device).contiguous(memory_format=torch.channels_last).to(dtype)
        return x[:, 1:6], 1
    if kind == "permuted_3d":  # dense, a permutation
        return torch.randn(7, 2, 3, device=device, dtype=dtype).permute(1, 2, 0), 1
    raise ValueError(kind)


STRIDE_KINDS = ["transposed", "transposed_dim0", "row_slice", "every_other", "expanded_rows",
                "expanded_channels", "nchw_slice", "channels_last_slice", "permuted_3d"]


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("kind", STRIDE_KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(backend, slope, kind, device):
    """Non-contiguous x (dense permutations keep their layout, others are densified) and a
    non-contiguous bias and upstream gradient."""
    x, dim = _strided(kind, device, torch.float32)
    assert not x.is_contiguous()
    n = x.shape[dim]
    compare(backend, x, 0.5 * torch.randn(n, device=device), slope, dim, tag=kind)
    b = torch.randn(2 * n, device=device)[::2]  # a strided bias
    dy = torch.randn(tuple(reversed(x.shape)), device=device).permute(*reversed(range(x.dim())))
    compare(backend, x, b, slope, dim, dy=dy, tag=f"{kind} strided bias/dy")


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("device", DEVICES)
def test_expanded_upstream_gradient(backend, slope, device):
    """y.sum().backward(): the upstream gradient is an expanded scalar (all strides 0)."""
    x, b = make((4, 2, 3, 5), device, torch.float32, dim=1, memory_format=torch.channels_last)
    dy = torch.ones((), device=device).expand(x.shape)
    _, grads = compare(backend, x, b, slope, 1, dy=dy, tag="expanded dy")
    xl, bl = leaf(x), leaf(b)
    with fusedstab.use_backend(backend):
        fs_blr(xl, bl, slope, 1).sum().backward()
    assert torch.equal(xl.grad, grads[0]) and torch.equal(bl.grad, grads[1])


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("shape,dim", [((5, 13), -1), ((2, 3, 4, 5), 1)], ids=["rows", "nchw"])
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_bias_none(backend, slope, shape, dim, device, dtype):
    """bias=None: plain leaky_relu (dim is then irrelevant but still accepted)."""
    x = torch.randn(shape, device=device).to(dtype)
    got, grads = compare(backend, x, None, slope, dim, tag="no bias")
    assert grads[1] is None


# (x dtype, bias dtype): the output has torch.promote_types' dtype, dx x's, dbias bias's
MIXED = [
    pytest.param("cpu", torch.float16, torch.float32, id="cpu-fp16x-fp32b"),
    pytest.param("cpu", torch.float32, torch.float16, id="cpu-fp32x-fp16b"),
    pytest.param("cpu", torch.float32, torch.float64, id="cpu-fp32x-fp64b"),
    pytest.param("cpu", torch.float64, torch.float32, id="cpu-fp64x-fp32b"),
    pytest.param("cuda", torch.float16, torch.float32, id="cuda-fp16x-fp32b", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, torch.float32, id="cuda-bf16x-fp32b", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float32, torch.bfloat16, id="cuda-fp32x-bf16b", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, torch.float16, id="cuda-bf16x-fp16b", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("device,xdt,bdt", MIXED)
def test_mixed_dtypes(backend, slope, device, xdt, bdt):
    x, b = make((5, 33), device, xdt, bias_dtype=bdt)
    got, (dx, db) = compare(backend, x, b, slope, -1, tag="mixed")
    assert got.dtype == torch.promote_types(xdt, bdt)
    assert dx.dtype == xdt and db.dtype == bdt
    x, b = make((2, 3, 4, 5), device, xdt, dim=1, bias_dtype=bdt, memory_format=torch.channels_last)
    compare(backend, x, b, slope, 1, tag="mixed NCHW channels_last")


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("which", ("x_only", "bias_only"))
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.bfloat16)))
def test_requires_grad_subsets(backend, slope, which, device, dtype):
    """Only one of x and bias requires grad: that one's gradient is right, the other gets none."""
    for shape, dim in (((5, 13), -1), ((2, 3, 4, 5), 1)):
        x, b = make(shape, device, dtype, dim=dim)
        _, (dx, db) = compare(backend, x, b, slope, dim, tag=which,
                              x_grad=which == "x_only", b_grad=which == "bias_only")
        assert (dx is None) == (which == "bias_only") and (db is None) == (which == "x_only")


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_at_all(backend, slope, device):
    """Neither input requires grad (inference): same values, no graph."""
    x, b = make((2, 3, 4, 5), device, torch.float32, dim=1, memory_format=torch.channels_last)
    with fusedstab.use_backend(backend):
        y = fs_blr(x, b, slope, 1)
        with torch.no_grad():
            y2 = fs_blr(leaf(x), leaf(b), slope, 1)
    assert y.grad_fn is None and y2.grad_fn is None
    exp = torch_blr(x.double(), b.double(), slope, 1)
    torch.testing.assert_close(y.double(), exp, rtol=1e-6, atol=1e-6)
    assert torch.equal(y, y2)


# ----------------------------------------------------------------------------- z == 0, NaN/Inf
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_zero_preactivation_gradient(backend, slope, device, dtype):
    """Where x + bias is exactly 0 the gradient is torch's: slope * dy (torch's rule: z > 0 ? dy :
    slope * dy); the output is 0."""
    for shape, dim in (((6, 13), -1), ((2, 5, 3, 3), 1)):
        x, b = make(shape, device, dtype, dim=dim)
        d = _dim(x, dim)
        bshape = [1] * x.dim()
        bshape[d] = -1
        zero_at = torch.rand(shape, device=device) < 0.4
        x = torch.where(zero_at, (-b).view(bshape).expand(shape), x).contiguous()
        z = x.double() + b.double().view(bshape)
        assert (z == 0).sum() >= 10 and (z != 0).any()
        got, (dx, db) = compare(backend, x, b, slope, dim, tag="z==0")
        assert (got[z == 0] == 0).all()
        # direct check of the z == 0 rule with a known upstream gradient
        with fusedstab.use_backend(backend):
            xl, bl = leaf(x), leaf(b)
            fs_blr(xl, bl, slope, dim).backward(torch.ones_like(got))
        exp = leaky_relu_factor(z, slope).to(dtype)
        # slope * 1 rounded once to the dtype (exactly torch's); fp64 to the tight fp64 tolerance
        tol = dict(rtol=1e-14, atol=0) if dtype == torch.float64 else dict(rtol=0, atol=0)
        torch.testing.assert_close(xl.grad[z == 0], exp[z == 0], **tol,
                                   msg=lambda m: f"gradient at z == 0 is not slope * dy: {m}")
        torch.testing.assert_close(xl.grad, exp, **tol)


def _nonfinite(shape, device, dim):
    x = torch.randn(shape, device=device)
    flat = x.view(-1)
    n = flat.numel()
    flat[0] = float("nan")
    flat[n // 3] = float("inf")
    flat[n // 2] = float("-inf")
    flat[n - 1] = float("-inf")
    flat[(2 * n) // 3] = float("inf")
    b = 0.5 * torch.randn(shape[dim], device=device)
    b[-1] = float("inf")  # + (-inf) at the last element: NaN
    if b.numel() > 2:
        b[1] = float("nan")
    return x, b


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("shape,dim", [((5, 13), -1), ((2, 3, 4, 5), 1)], ids=["rows", "nchw"])
@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_propagate_like_torch(backend, slope, shape, dim, device):
    """NaN and +-Inf in x and bias: torch's NaN/Inf pattern in y, dx and dbias (e.g. slope 0 and
    z = -inf gives NaN, as -inf * 0 does in torch)."""
    x, b = _nonfinite(shape, device, dim)
    dy = torch.randn(shape, device=device)
    got, gg = run(lambda a, c: fs_blr(a, c, slope, dim), [leaf(x), leaf(b)], dy, backend)
    eager, ge = run(lambda a, c: torch_blr(a, c, slope, dim), [leaf(x), leaf(b)], dy)
    assert not torch.isfinite(eager).all()
    assert_same_nonfinite(got, eager, f"[{backend}] slope={slope} y")
    for name, g, e in zip(("dx", "dbias"), gg, ge):
        assert_same_nonfinite(g, e, f"[{backend}] slope={slope} {name}", atol=1e-5)


# ----------------------------------------------------------------------------- empty tensors
EMPTY = [((0, 7), -1), ((3, 0), -1), ((2, 0, 5), -1), ((0, 3, 4, 5), 1), ((2, 3, 0, 5), 1), ((2, 0, 4, 4), 1),
         ((0, 3), 0)]


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("shape,dim", EMPTY, ids=[f"{'x'.join(map(str, s))}-dim{d}" for s, d in EMPTY])
@pytest.mark.parametrize("device", DEVICES)
def test_empty(backend, slope, shape, dim, device):
    """Zero elements: empty output and dx, dbias zeros (of bias's size, possibly 0), like torch."""
    x = torch.randn(shape, device=device)
    b = torch.randn(shape[dim], device=device)
    dy = torch.randn(shape, device=device)
    got, gg = run(lambda a, c: fs_blr(a, c, slope, dim), [leaf(x), leaf(b)], dy, backend)
    eager, ge = run(lambda a, c: torch_blr(a, c, slope, dim), [leaf(x), leaf(b)], dy)
    assert got.shape == eager.shape and got.dtype == eager.dtype
    for name, g, e in zip(("dx", "dbias"), gg, ge):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda s: f"{name}: {s}")


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("shape,dim,fmt", [((300, 33), -1, None), ((8, 5, 9, 7), 1, "cl"),
                                           ((8, 5, 9, 7), 1, None)], ids=["rows", "nchw-cl", "nchw"])
@pytest.mark.parametrize("device", DEVICES)
def test_dbias_deterministic(backend, slope, shape, dim, fmt, device):
    """Two backward runs give bitwise identical dx and dbias (partial sums, no atomics)."""
    if device == "cuda":  # enough rows for many programs on a GPU
        shape = (shape[0] * 64, *shape[1:])
    mf = torch.channels_last if fmt == "cl" else None
    x, b = make(shape, device, torch.float32, dim=dim, memory_format=mf)
    dy = torch.randn(shape, device=device)
    (o1, g1), (o2, g2) = [run(lambda a, c: fs_blr(a, c, slope, dim), [leaf(x), leaf(b)], dy, backend)
                          for _ in range(2)]
    assert torch.equal(o1, o2)
    assert torch.equal(g1[0], g2[0]), "dx differs between two identical backward runs"
    assert torch.equal(g1[1], g2[1]), "dbias differs between two identical backward runs"
    # and it is the right sum
    z = x.double() + b.double().view([-1 if i == _dim(x, dim) else 1 for i in range(x.dim())])
    g = dy.double() * leaky_relu_factor(z, slope)
    other = [i for i in range(x.dim()) if i != _dim(x, dim)]
    torch.testing.assert_close(g1[1].double(), g.sum(other), rtol=1e-5, atol=1e-5 * g.abs().sum(other).max().item())


# ----------------------------------------------------------------------------- reference
def test_reference_matches_torch():
    """The reference (what the torch backend serves calls with) is torch's expression."""
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    b, b4 = torch.randn(5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for slope in SLOPES:
        torch.testing.assert_close(reference.bias_leaky_relu(x, b, slope, 1), torch_blr(x, b, slope, 1),
                                   rtol=0, atol=0)
        torch.testing.assert_close(reference.bias_leaky_relu(x, b4, slope, -1), torch_blr(x, b4, slope, -1),
                                   rtol=0, atol=0)
        torch.testing.assert_close(reference.bias_leaky_relu(x, None, slope, 1), F.leaky_relu(x, slope),
                                   rtol=0, atol=0)


def test_autograd_function_apply(backend):
    """fusedstab.autograd.BiasLeakyReLUFunction.apply(x, bias, slope, dim) is what functional calls."""
    from fusedstab.autograd import BiasLeakyReLUFunction

    x, b = make((2, 3, 4, 5), "cpu", torch.float32, dim=1)
    dy = torch.randn(x.shape)
    a = run(lambda u, v: BiasLeakyReLUFunction.apply(u, v, -0.3, 1), [leaf(x), leaf(b)], dy, backend)
    f = run(lambda u, v: fs_blr(u, v, -0.3, 1), [leaf(x), leaf(b)], dy, backend)
    assert torch.equal(a[0], f[0]) and all(torch.equal(p, q) for p, q in zip(a[1], f[1]))
    torch.testing.assert_close(a[0], torch_blr(x, b, -0.3, 1))


# ============================================================================= what is saved
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("shape,dim", [((6, 13), -1), ((2, 3, 4, 5), 1)], ids=["rows", "nchw"])
def test_saves_output_or_bit_mask(backend, slope, shape, dim):
    """slope >= 0: backward keeps the output y (no copy of x); slope < 0: a packed bit mask, one bit an
    element (ceil(L/8) bytes a row), no floating-point tensor of x's size."""
    x, b = make(shape, "cpu", torch.float32, dim=dim)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with fusedstab.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fs_blr(leaf(x), leaf(b), slope, dim)
    big = [t for t in saved if t.numel() >= x.numel()]
    small_bytes = sum(t.numel() * t.element_size() for t in saved if t.numel() < x.numel())
    assert small_bytes <= 8 * b.numel() + 64, [(t.shape, t.dtype) for t in saved]
    if slope >= 0:
        assert len(big) == 1, [(t.shape, t.dtype) for t in saved]
        # y itself (possibly as its 2-D rows view in memory order): the same values, same dtype
        assert big[0].dtype == y.dtype and big[0].numel() == y.numel(), "the saved tensor is not y"
        assert torch.equal(big[0].reshape(-1).sort().values, y.detach().reshape(-1).sort().values), \
            "the saved tensor is not y"
    else:
        assert all(not t.is_floating_point() for t in saved if t.numel() >= x.numel() // 8), \
            [(t.shape, t.dtype) for t in saved]
        masks = [t for t in saved if t.dtype == torch.uint8]
        assert len(masks) == 1, [(t.shape, t.dtype) for t in saved]
        L = x.shape[-1] if dim in (-1, x.dim() - 1) else math.prod(x.shape[2:])
        R = x.numel() // L
        assert masks[0].numel() == R * math.ceil(L / 8)


@pytest.mark.parametrize("slope", (0.01, 0.0, 1.5))
def test_inplace_change_of_saved_output_is_caught(backend, slope):
    """The output saved for backward must not be silently read after an in-place change: either
    autograd refuses (version counter) or the gradient is still right."""
    x, b = make((4, 9), "cpu", torch.float32)
    xl, bl = leaf(x), leaf(b)
    with fusedstab.use_backend(backend):
        y = fs_blr(xl, bl, slope)
        with torch.no_grad():
            y.mul_(-1.0)  # flips every sign
        try:
            y.backward(torch.ones_like(y))
        except RuntimeError as e:
            assert "inplace" in str(e) or "modified" in str(e), e
            return
    z = x.double() + b.double()
    torch.testing.assert_close(xl.grad.double(), leaky_relu_factor(z, slope))


# ============================================================================= custom ops
def _rows_args(R, L, C, per_row, xdt=torch.float32, bdt=torch.float32, has_bias=True, strided=False):
    x = torch.randn(R, L + (3 if strided else 0), device=DEV).to(xdt)
    if strided:
        x = x[:, 2:L + 2]
    b = (0.5 * torch.randn(C, device=DEV)).to(bdt) if has_bias else None
    return x, b


def _expected_z(x2, b, per_row):
    z = x2.double()
    if b is None:
        return z
    if per_row:
        idx = torch.arange(x2.shape[0], device=x2.device) % b.numel()
        return z + b.double()[idx][:, None]
    return z + b.double()[None, :]


# (id, R, L, C, per_row, x dtype, bias dtype, has_bias, strided rows)
OP_CASES = [
    ("cols", 5, 13, 13, False, torch.float32, torch.float32, True, False),
    ("cols-strided", 5, 13, 13, False, torch.float32, torch.float32, True, True),
    ("cols-fp16x-fp32b", 4, 9, 9, False, torch.float16, torch.float32, True, False),
    ("cols-fp64", 3, 8, 8, False, torch.float64, torch.float64, True, False),
    ("cols-nobias", 4, 7, 7, False, torch.float32, torch.float32, False, False),
    ("rows", 6, 12, 3, True, torch.float32, torch.float32, True, False),  # (N=2, C=3) rows of H*W=12
    ("rows-L1", 6, 1, 3, True, torch.float32, torch.float32, True, False),
    ("rows-fp16", 4, 17, 2, True, torch.float16, torch.float16, True, False),
    ("empty", 0, 5, 5, False, torch.float32, torch.float32, True, False),
]


def _fwd_case(case):
    _, R, L, C, per_row, xdt, bdt, has_b, strided = case
    return _rows_args(R, L, C, per_row, xdt, bdt, has_b, strided), per_row


def _op_input(x2, b, per_row):
    """The fwd op's (x, dim) for a 2-D case: (R, L) with the bias per column is x2 with dim 1; rows of L
    with the bias index row % C are x2 as (R // C, C, L) (a view) with dim 1."""
    return (x2.unflatten(0, (-1, 1 if b is None else b.numel())) if per_row else x2), 1


def _fwd_2d(x2, b, slope, per_row):
    """The fwd op on a 2-D case: (y, mask, (R, L), per_row) in the op's own 2-D view of x (for L == 1
    with per-row bias that is (R // C, C) with the bias per column: the same elements)."""
    x, dim = _op_input(x2, b, per_row)
    y, mask = OPS.bias_leaky_relu_fwd(x, b, slope, dim)
    assert y.shape == x.shape
    _, _, rl, pr = memory_order_2d(x, dim)
    return y.reshape(rl), mask, rl, pr


def _bwd_args(dy2, saved, slope, per_row, C, x_dtype, bias, need_dx=True):
    """fusedstab::bias_leaky_relu_bwd(dy, saved, slope, per_row, C, dx_dtype, need_dx, need_dbias)."""
    return (dy2, saved, slope, per_row, C, x_dtype, need_dx, bias is not None)


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck_fwd(case, slope, op_backend):
    (x2, b), per_row = _fwd_case(case)
    x, dim = _op_input(x2, b, per_row)
    torch.library.opcheck(OPS.bias_leaky_relu_fwd, (x, b, slope, dim))


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck_bwd(case, slope, op_backend):
    (x2, b), per_row = _fwd_case(case)
    y2, mask, _, per_row = _fwd_2d(x2, b, slope, per_row)
    saved = y2 if slope >= 0 else mask
    dy2 = torch.randn(y2.shape, device=DEV).to(y2.dtype)
    C = b.numel() if b is not None else (y2.shape[1] if not per_row else 1)
    for need_dx in (True, False):
        torch.library.opcheck(OPS.bias_leaky_relu_bwd,
                              _bwd_args(dy2, saved, slope, per_row, C, x2.dtype, b, need_dx))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_outputs(case, slope, op_backend):
    """The fwd op: y in x's shape, contiguous, in the promoted dtype with the right values; the mask,
    for slope < 0, uint8 (R, ceil(L/8)) over the op's 2-D view with bit j of byte k set iff element
    8k+j of the row is > 0 before the activation; an empty tensor for slope >= 0. The bwd op: dx right
    in x's dtype, dbias right in the accumulation dtype (the autograd Function casts it to bias's
    dtype)."""
    (x2, b), per_row = _fwd_case(case)
    z = _expected_z(x2, b, per_row)
    y2, mask, (R, L), per_row = _fwd_2d(x2, b, slope, per_row)
    z = z.reshape(R, L)
    od = x2.dtype if b is None else torch.promote_types(x2.dtype, b.dtype)
    assert y2.dtype == od and y2.is_contiguous()
    torch.testing.assert_close(y2.double(), F.leaky_relu(z, slope), rtol=1e-3 if od == torch.float16 else 1e-6,
                               atol=1e-6)
    if slope >= 0:
        assert mask.numel() == 0
        saved = y2
    else:
        nb = (L + 7) // 8
        assert mask.dtype == torch.uint8 and mask.shape == (R, nb)
        shifts = torch.arange(8, dtype=torch.int32, device=DEV)
        bits = ((mask[:, :, None].to(torch.int32) >> shifts) & 1).reshape(R, nb * 8)
        assert torch.equal(bits[:, :L].bool(), z > 0), "mask bits are not (x + bias > 0)"
        saved = mask
    dy2 = torch.randn(R, L, device=DEV).to(od)
    C = b.numel() if b is not None else (L if not per_row else 1)
    outs = OPS.bias_leaky_relu_bwd(*_bwd_args(dy2, saved, slope, per_row, C, x2.dtype, b))
    dx2, db = outs[0], outs[1]
    g = dy2.double() * leaky_relu_factor(z, slope)
    assert dx2.shape == (R, L) and dx2.dtype == x2.dtype
    torch.testing.assert_close(dx2.double(), g, rtol=1e-3 if x2.dtype == torch.float16 else 1e-6, atol=1e-6)
    if b is None:
        assert db.numel() == 0
    else:
        assert db.shape == b.shape and db.dtype == reference.acc_dtype(od)
        if per_row:
            exp = torch.zeros(C, dtype=torch.float64, device=DEV).index_add_(
                0, torch.arange(R, device=DEV) % C, g.sum(1))
        else:
            exp = g.sum(0)
        torch.testing.assert_close(db.double(), exp, rtol=1e-6, atol=1e-6 * max(1.0, g.abs().sum().item()))


# ============================================================================= gradcheck
GRADCHECK = [((4, 5), -1), ((2, 3, 2, 2), 1), ((3, 4), 0), ((2, 3, 5), 1), ((7,), 0)]


@pytest.mark.parametrize("slope", (0.01, -0.3, 1.5))
@pytest.mark.parametrize("shape,dim", GRADCHECK, ids=[f"{'x'.join(map(str, s))}-dim{d}" for s, d in GRADCHECK])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(backend, slope, shape, dim, device):
    x, b = make(shape, device, torch.float64, dim=dim)
    x = x + torch.where(x >= 0, 0.05, -0.05)  # keep z away from the kink for the finite differences
    cases = [(x, b)]
    if len(shape) == 4:
        cases.append((x.contiguous(memory_format=torch.channels_last), b))
    with fusedstab.use_backend(backend):
        for xx, bb in cases:
            z = xx + bb.view([-1 if i == _dim(xx, dim) else 1 for i in range(xx.dim())])
            assert z.abs().min() > 1e-4
            assert torch.autograd.gradcheck(lambda u, v: fs_blr(u, v, slope, dim),
                                            (xx.detach().requires_grad_(), bb.detach().requires_grad_()),
                                            eps=1e-6, atol=1e-6, rtol=1e-5)
        assert torch.autograd.gradcheck(lambda u: fs_blr(u, None, slope, dim),
                                        (x.detach().requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("slope", (0.2, -0.3))
def test_gradgradcheck_or_clear_error(backend, slope):
    """Double backward: either right (gradgradcheck) or a clear error, never silently wrong."""
    x, b = make((3, 4), "cpu", torch.float64)
    x = x + torch.where(x >= 0, 0.05, -0.05)
    xl, bl = leaf(x), leaf(b)
    with fusedstab.use_backend(backend):
        try:
            ok = torch.autograd.gradgradcheck(lambda u, v: fs_blr(u, v, slope), (xl, bl), eps=1e-6, atol=1e-6)
        except RuntimeError as e:
            assert str(e)
            return
    assert ok


# ============================================================================= torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _chain(x, b, b2):
    """Two ops in one graph (NCHW per-channel, then rows), the second one on the first one's output."""
    y = FS.bias_leaky_relu(x, b, 0.2, 1)
    y = FS.bias_leaky_relu(y * 2, b2, -0.3, -1)
    return FS.bias_leaky_relu(y, None, 0.0) + 1


def _run_fn(fn, leaves, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    g = torch.Generator(device=DEV).manual_seed(seed)
    (out * torch.randn(out.shape, generator=g, device=DEV, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _chain_leaves():
    x = torch.randn(2, 3, 4, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    return [x, torch.randn(3, device=DEV), torch.randn(5, device=DEV)]


def test_compile_fullgraph_aot_eager_parity(op_backend, fresh_dynamo):
    """fullgraph capture, one frame, the custom ops in the forward and backward graphs, and the same
    outputs and gradients as eager."""
    be, graphs = graph_recorder()
    leaves = _chain_leaves()
    eager = _run_fn(_chain, leaves)
    compiled = _run_fn(torch.compile(_chain, backend=be, fullgraph=True), leaves)
    torch.testing.assert_close(compiled[0], eager[0])
    for a, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, e)
    fw = {str(n.target) for gm in graphs["fw"] for n in gm.graph.nodes if n.op == "call_function"}
    bw = {str(n.target) for gm in graphs["bw"] for n in gm.graph.nodes if n.op == "call_function"}
    assert any("fusedstab.bias_leaky_relu_fwd" in t for t in fw), fw
    assert any("fusedstab.bias_leaky_relu_bwd" in t for t in bw), bw
    assert not any("leaky_relu" in t and "fusedstab" not in t for t in fw | bw), fw | bw
    # against torch too
    ref = _run_fn(lambda x, b, b2: F.leaky_relu(torch_blr(torch_blr(x, b, 0.2, 1) * 2, b2, -0.3), 0.0) + 1, leaves)
    torch.testing.assert_close(compiled[0], ref[0])
    for a, e in zip(compiled[1], ref[1]):
        torch.testing.assert_close(a, e)


def test_compile_dynamic_shapes(fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("aot_eager")
    cf = torch.compile(lambda x, b: FS.bias_leaky_relu(x, b, -0.3, 1), backend=cnt, fullgraph=True, dynamic=True)
    for shape in ((2, 3, 4, 5), (3, 3, 2, 7), (4, 6, 3, 3)):  # no size 1: dynamo specializes it
        x, b = make(shape, DEV, torch.float32, dim=1)
        torch.testing.assert_close(_run_fn(cf, [x, b])[0], _run_fn(lambda u, v: torch_blr(u, v, -0.3, 1), [x, b])[0])
    assert cnt.frame_count == 1


def test_compile_inductor(fresh_dynamo):
    """The default (inductor) backend: the ops stay opaque, values and gradients match (on the triton
    backend where it can run)."""
    leaves = _chain_leaves()
    with fusedstab.use_backend("triton" if _triton_ok_on_dev() else "torch"):
        eager = _run_fn(_chain, leaves)
        compiled = _run_fn(torch.compile(_chain, fullgraph=True), leaves)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_compile_module(fresh_dynamo):
    m = fnn.BiasLeakyReLU(3, negative_slope=-0.3, dim=1, device=DEV)
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(2, 3, 4, 5, device=DEV)
    eager = _run_fn(m, [x])
    compiled = _run_fn(torch.compile(m, backend="aot_eager", fullgraph=True), [x])
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1][0], eager[1][0])


# ============================================================================= nn module
def test_module_defaults_and_repr():
    m = fnn.BiasLeakyReLU(8)
    assert m.num_features == 8 and m.negative_slope == 0.01 and m.dim == -1
    assert repr(m) == "BiasLeakyReLU(num_features=8, negative_slope=0.01, dim=-1)"
    assert [n for n, _ in m.named_parameters()] == ["bias"]
    assert m.bias.shape == (8,) and m.bias.dtype == torch.get_default_dtype() and m.bias.requires_grad
    assert torch.equal(m.bias, torch.zeros(8)), "bias is not initialised to zeros"
    assert list(m.state_dict()) == ["bias"]
    assert list(m.named_buffers()) == []
    m2 = fnn.BiasLeakyReLU(3, negative_slope=-0.3, dim=1)
    assert repr(m2) == "BiasLeakyReLU(num_features=3, negative_slope=-0.3, dim=1)"
    assert m2.negative_slope == -0.3 and m2.dim == 1
    m3 = fnn.BiasLeakyReLU(4, 0.2, 0)
    assert (m3.negative_slope, m3.dim) == (0.2, 0)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.float16), ("meta", torch.float32),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_module_factory_kwargs(device, dtype):
    m = fnn.BiasLeakyReLU(5, device=device, dtype=dtype)
    assert m.bias.dtype == dtype and m.bias.device.type == device
    if device != "meta":
        assert (m.bias == 0).all()


@pytest.mark.parametrize("slope,dim,shape", [(0.01, -1, (3, 7, 8)), (-0.3, 1, (2, 8, 3, 3)), (0.0, 0, (8, 5))])
def test_module_forward_backward_vs_eager(backend, slope, dim, shape):
    m = fnn.BiasLeakyReLU(8, negative_slope=slope, dim=dim)
    with torch.no_grad():
        m.bias.copy_(torch.randn(8))
    x = torch.randn(shape)
    dy = torch.randn(shape)
    with fusedstab.use_backend(backend):
        xl = leaf(x)
        y = m(xl)
        y.backward(dy)
    xt, bt = leaf(x), leaf(m.bias)
    yt = torch_blr(xt, bt, slope, dim)
    yt.backward(dy)
    torch.testing.assert_close(y, yt)
    torch.testing.assert_close(xl.grad, xt.grad)
    torch.testing.assert_close(m.bias.grad, bt.grad)
    # a fresh module (zero bias) is plain leaky_relu
    fresh = fnn.BiasLeakyReLU(8, negative_slope=slope, dim=dim)
    with fusedstab.use_backend(backend):
        torch.testing.assert_close(fresh(x), F.leaky_relu(x, slope))


def test_module_state_dict_roundtrip():
    a = fnn.BiasLeakyReLU(6, negative_slope=0.2)
    with torch.no_grad():
        a.bias.normal_()
    b = fnn.BiasLeakyReLU(6, negative_slope=0.2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.bias, b.bias)
    with pytest.raises(RuntimeError):
        fnn.BiasLeakyReLU(5).load_state_dict(a.state_dict())


# ============================================================================= bad input
_X = lambda: torch.randn(3, 4)  # noqa: E731
BAD = [
    ("bias-too-long", lambda f: f(_X(), torch.ones(5))),
    ("bias-too-short", lambda f: f(_X(), torch.ones(3))),
    ("bias-wrong-size-dim0", lambda f: f(_X(), torch.ones(4), 0.01, 0)),
    ("bias-wrong-size-nchw", lambda f: f(torch.randn(2, 3, 4, 5), torch.ones(5), 0.01, 1)),
    ("dim-too-large", lambda f: f(_X(), torch.ones(4), 0.01, 2)),
    ("dim-too-small", lambda f: f(_X(), torch.ones(3), 0.01, -3)),
    ("int64-x-no-bias", lambda f: f(torch.ones(3, 4, dtype=torch.int64), None)),
    ("int32-x-no-bias", lambda f: f(torch.ones(3, 4, dtype=torch.int32), None)),
    ("bool-x-no-bias", lambda f: f(torch.ones(3, 4, dtype=torch.bool), None)),
    ("complex-x-no-bias", lambda f: f(torch.ones(3, 4, dtype=torch.complex64), None)),
    ("bias-other-device-meta", lambda f: f(_X(), torch.ones(4, device="meta"))),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_like_torch(case):
    _, call = case
    assert_raises_like_torch(lambda: call(torch_blr), lambda: call(fs_blr))


@pytest.mark.parametrize("dt", (torch.int64, torch.bool))
def test_non_float_x_with_float_bias_promotes_like_torch(dt):
    """Integer/bool x with a float bias: x + bias promotes to the bias's dtype, as in torch."""
    x = torch.randint(-3, 4, (3, 4)).to(dt)
    b = torch.randn(4)
    got = fs_blr(x, b, 0.1)
    want = F.leaky_relu(x + b, 0.1)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("x_dt,b_dt", ((torch.complex64, torch.float32), (torch.int64, torch.int64),
                                       (torch.float32, torch.complex64)))
def test_non_float_result_raises_like_leaky_relu(x_dt, b_dt):
    """Where x + bias is not floating (integer, complex), the type torch's F.leaky_relu raises."""
    x, b = torch.ones(3, 4, dtype=x_dt), torch.ones(4, dtype=b_dt)
    assert_raises_like_torch(lambda: F.leaky_relu(x + b, 0.01), lambda: fs_blr(x, b))


def test_bias_not_1d_raises():
    with pytest.raises(RuntimeError):
        fs_blr(_X(), torch.ones(1, 4))
    with pytest.raises(RuntimeError):
        fs_blr(_X(), torch.ones(2, 2))
    with pytest.raises(RuntimeError):
        fs_blr(_X(), torch.ones(()))


def test_zero_dim_x_raises():
    with pytest.raises((IndexError, RuntimeError)):
        fs_blr(torch.randn(()), torch.ones(1))


def test_module_bad_input_raises_like_torch():
    m = fnn.BiasLeakyReLU(4)
    assert_raises_like_torch(lambda: torch_blr(torch.randn(3, 5), m.bias), lambda: m(torch.randn(3, 5)))


@pytest.mark.gpu
def test_device_mismatch_raises_like_torch():
    x = torch.randn(3, 4, device="cuda")
    for b in (torch.ones(4), torch.ones(4, device="cpu", dtype=torch.float16)):
        assert_raises_like_torch(lambda: torch_blr(x, b), lambda: fs_blr(x, b))
    assert_raises_like_torch(lambda: torch_blr(x.cpu(), b.cuda()), lambda: fs_blr(x.cpu(), b.cuda()))


# ============================================================================= GPU-only: large
@pytest.mark.gpu
@pytest.mark.parametrize("slope", (0.01, -0.3))
def test_large_tensor_over_2_31_elements(slope):
    """More than 2^31 elements in fp16 (int64 indexing): checked chunk by chunk against an fp32
    computation on the GPU, with the elements past 2^31 included; dbias against a float64 sum."""
    free, _ = torch.cuda.mem_get_info()
    N = 1003  # not a multiple of 8
    M = (2 ** 31) // N + 64
    need = 4 * M * N * 2 + (4 << 30)  # x, y, dy, dx in fp16 + chunk work space
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    assert M * N > 2 ** 31
    torch.cuda.empty_cache()
    x = torch.randn(M, N, device="cuda", dtype=torch.float16)
    b = (0.5 * torch.randn(N, device="cuda")).half()
    xl, bl = x.requires_grad_(), b.requires_grad_()
    y = fs_blr(xl, bl, slope)
    dy = torch.randn(M, N, device="cuda", dtype=torch.float16)
    y.backward(dy)
    dx, db = xl.grad, bl.grad
    db_exp = torch.zeros(N, device="cuda", dtype=torch.float64)
    db_scale = torch.zeros(N, device="cuda", dtype=torch.float64)
    step = (1 << 27) // N
    with torch.no_grad():
        for r0 in range(0, M, step):
            sl = slice(r0, min(M, r0 + step))
            z = x[sl].float() + b.float()
            exp = F.leaky_relu(z, slope)
            torch.testing.assert_close(y[sl].float(), exp, rtol=1e-3, atol=1e-6, msg=lambda s: f"y rows {sl}: {s}")
            g = dy[sl].float() * leaky_relu_factor(z, slope)
            torch.testing.assert_close(dx[sl].float(), g, rtol=1e-3, atol=1e-6, msg=lambda s: f"dx rows {sl}: {s}")
            db_exp += g.double().sum(0)
            db_scale += g.double().abs().sum(0)
    torch.testing.assert_close(db.double(), db_exp, rtol=2 ** -10, atol=1e-5 * db_scale.max().item())

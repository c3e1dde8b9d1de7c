"""Linear + bias + Leaky ReLU: ``fusedstab.functional.linear_leaky_relu(x, weight, bias, negative_slope)``.

Every result is compared with a float64 truth (torch on float64 copies of the very same inputs) and
with eager torch in the test dtype (``F.leaky_relu(F.linear(x, weight, bias), slope)``) by the
per-dtype rule in ``helpers`` (fp32/fp64 tight, relative to each element's conditioning
sum |x| |w|; fp16/bf16 at most 2x torch's own error). On CPU the Triton matmul runs through the
interpreter, in exact fp32; on the GPU fp32 is checked with tf32 off (torch's default) at the same
tight tolerance.

Where the sign of the pre-activation z is decided by rounding (|z| below 1e-4 of its conditioning),
the upstream gradient is set to 0 so that neither side's choice of branch counts; exact zeros of z
are tested on their own with integer-valued inputs, where every order of summation is exact.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import fusedstab
import fusedstab.nn as fnn
from fusedstab import backend as fs_backend
from fusedstab import functional as FS
from fusedstab import reference

from helpers import (DEVICES, LOWP_FLOOR, LOWP_RATIO, assert_matches, assert_raises_like_torch,
                     assert_same_nonfinite, device_dtypes, leaf, leaky_relu_factor, max_err, run)

SLOPES = (0.01, 0.2, 0.0, 1.0, 1.5, -0.3)
OPS = torch.ops.fusedstab
SIGN_TOL = 1e-4
# API tests (custom op, compile) run where the triton backend runs: CUDA if there is a GPU, else CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 matmuls in full precision (torch's default), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def torch_llr(x, weight, bias=None, negative_slope=0.01):
    return F.leaky_relu(F.linear(x, weight, bias), negative_slope)


def fs_llr(x, weight, bias=None, negative_slope=0.01):
    return FS.linear_leaky_relu(x, weight, bias, negative_slope)


def conditioning(x, w, b, dy, slope):
    """float64 conditioning scales (each >= 1) of z (per element), dx, dweight (per element) and
    dbias (per element), and z itself: the sums of |terms| each result is computed from."""
    x64, w64 = x.double(), w.double()
    z = F.linear(x64, w64, None if b is None else b.double())
    cz = F.linear(x64.abs(), w64.abs(), None if b is None else b.double().abs())
    g = dy.double() * leaky_relu_factor(z, slope)
    ga = g.abs()
    cdx = ga @ w64.abs()
    g2, x2 = ga.reshape(-1, w.shape[0]), x64.abs().reshape(-1, w.shape[1])
    cdw = g2.t() @ x2
    cdb = g2.sum(0)
    one = lambda t: t.clamp(min=1.0)  # noqa: E731
    return z, cz, one(cz * max(1.0, abs(slope))), one(cdx), one(cdw), one(cdb)


def compare(backend, x, w, b, slope, dy=None, tag="", grads=(True, True, True), mask_signs=True):
    """fusedstab under ``backend`` vs the float64 truth vs eager torch: y and the gradients of x,
    weight and bias (those given and requiring grad). ``mask_signs``: the upstream gradient is zeroed
    where the sign of z is ill-conditioned (off only for inputs whose z is exact)."""
    N = w.shape[0]
    if dy is None:
        dy = torch.randn(*x.shape[:-1], N, device=x.device).to(x.dtype)
    z, cz, sy, sdx, sdw, sdb = conditioning(x, w, b, dy, slope)
    if mask_signs:  # ill-conditioned signs out
        dy = torch.where(z.abs() < SIGN_TOL * cz, 0.0, dy.double()).to(dy.dtype)
    lv = lambda dt=None: [leaf(x, dt, grads[0]), leaf(w, dt, grads[1]), leaf(b, dt, grads[2])]  # noqa: E731
    got, gg = run(lambda *a: fs_llr(*a, slope), lv(), dy, backend)
    eager, ge = run(lambda *a: torch_llr(*a, slope), lv(), dy)
    truth, gt = run(lambda *a: torch_llr(*a, slope), lv(torch.float64), dy.double())
    tag = f"{tag} [{backend}] slope={slope} x{tuple(x.shape)} w{tuple(w.shape)} {x.dtype}"
    assert_matches(got, truth, eager, f"{tag} y", scale=sy)
    for name, g, e, t, inp, sc in zip(("dx", "dweight", "dbias"), gg, ge, gt, (x, w, b), (sdx, sdw, sdb)):
        if e is None:
            assert g is None, f"{tag} {name}: a gradient where torch gives none"
            continue
        assert g.dtype == inp.dtype and g.shape == inp.shape, f"{tag} {name}: {g.dtype} {tuple(g.shape)}"
        assert_matches(g, t, e, f"{tag} {name}", scale=sc.reshape(g.shape) if g.numel() else None)
    return got, gg


def make(xshape, N, device, dtype, bias=True):
    K = xshape[-1]
    x = torch.randn(xshape, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / max(1, K) ** 0.5).to(dtype)
    b = (0.5 * torch.randn(N, device=device)).to(dtype) if bias else None
    return x, w, b


def _skip_gpu_fp64_triton(backend, device, dtype):
    """fp64 matmuls on CUDA are left to cuBLAS: the triton backend refuses them (clear error)."""
    if backend == "triton" and device == "cuda" and dtype == torch.float64:
        x, w, b = make((3, 4), 5, device, dtype)
        with fusedstab.use_backend("triton"), pytest.raises(fusedstab.BackendError, match="fp64"):
            fs_llr(x, w, b)
        return True
    return False


# ============================================================================= values and gradients
# (x shape, out_features): 1-D x, single elements, sizes across the 32x32x16 interpreter tiles and
# the GPU tiles, leading batch dims, K = 1.
SHAPES = [((7,), 5), ((1, 1), 1), ((3, 17), 33), ((17, 33), 3), ((33, 65), 17), ((65, 3), 130),
          ((130, 130), 65), ((2, 3, 17), 33), ((2, 1, 5, 1), 3), ((5, 1), 7)]


@pytest.mark.parametrize("xshape,N", SHAPES, ids=[f"{'x'.join(map(str, s))}-N{n}" for s, n in SHAPES])
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_shapes(backend, xshape, N, device, dtype):
    if _skip_gpu_fp64_triton(backend, device, dtype):
        return
    slope = -0.3 if xshape[-1] % 2 else 0.01  # both save paths across the shapes
    compare(backend, *make(xshape, N, device, dtype), slope, tag="shapes")


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_slopes(backend, slope, device, dtype):
    if _skip_gpu_fp64_triton(backend, device, dtype):
        return
    compare(backend, *make((2, 19, 37), 45, device, dtype), slope, tag="slopes")


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("xshape,N", [((5, 17), 33), ((9,), 4), ((2, 3, 1), 7)], ids=["2d", "1d", "3d-K1"])
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.float16, torch.bfloat16)))
def test_bias_none(backend, slope, xshape, N, device, dtype):
    _, (_, _, db) = compare(backend, *make(xshape, N, device, dtype, bias=False), slope, tag="no bias")
    assert db is None


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("which", ("x", "weight", "bias", "x+bias", "weight+bias"))
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.bfloat16)))
def test_requires_grad_subsets(backend, slope, which, device, dtype):
    """Only some inputs require grad: theirs are right, the others get none."""
    req = tuple(n in which.split("+") for n in ("x", "weight", "bias"))
    _, grads = compare(backend, *make((6, 21), 11, device, dtype), slope, tag=which, grads=req)
    assert tuple(g is not None for g in grads) == req


def _strided(kind, M, K, N, device):
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device) / K ** 0.5
    b = 0.5 * torch.randn(N, device=device)
    if kind == "x_transposed":
        x = torch.randn(K, M, device=device).t()
    elif kind == "x_row_slice":
        x = torch.randn(M, K + 7, device=device)[:, 3:K + 3]
    elif kind == "x_every_other_col":
        x = torch.randn(M, 2 * K, device=device)[:, ::2]
    elif kind == "x_expanded":
        x = torch.randn(1, K, device=device).expand(M, K)
    elif kind == "x_permuted_3d":
        x = torch.randn(K, 2, M, device=device).permute(1, 2, 0)
    elif kind == "w_transposed":  # (K, N) storage, e.g. a tied embedding
        w = (torch.randn(K, N, device=device) / K ** 0.5).t()
    elif kind == "w_slice_and_strided_bias":
        w = (torch.randn(N + 4, 2 * K, device=device) / K ** 0.5)[2:N + 2, ::2]
        b = torch.randn(3 * N, device=device)[::3]
    else:
        raise ValueError(kind)
    return x, w, b


STRIDE_KINDS = ["x_transposed", "x_row_slice", "x_every_other_col", "x_expanded", "x_permuted_3d",
                "w_transposed", "w_slice_and_strided_bias"]


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("kind", STRIDE_KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(backend, slope, kind, device):
    x, w, b = _strided(kind, 10, 19, 35, device)
    assert not (x.is_contiguous() and w.is_contiguous() and b.is_contiguous())
    N = w.shape[0]
    dy = torch.randn(N, *x.shape[:-1], device=device).movedim(0, -1)  # a non-contiguous upstream gradient
    compare(backend, x, w, b, slope, dy=dy, tag=kind)


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("device", DEVICES)
def test_expanded_upstream_gradient(backend, slope, device):
    """y.sum().backward(): an expanded scalar upstream gradient; the user's path gives the same."""
    x, w, b = make((3, 4, 9), 6, device, torch.float32)
    dy = torch.ones((), device=device).expand(3, 4, 6)
    _, grads = compare(backend, x, w, b, slope, dy=dy, tag="expanded dy")
    lv = [leaf(t) for t in (x, w, b)]
    with fusedstab.use_backend(backend):
        fs_llr(*lv, slope).sum().backward()
    for t, g in zip(lv, grads):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


# ----------------------------------------------------------------------------- z == 0, NaN/Inf
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_zero_preactivation_gradient(backend, slope, device, dtype):
    """Integer-valued inputs make z exact in every dtype and summation order; whole rows of z are
    exactly 0 there: the gradient is slope * dy (torch's z > 0 ? dy : slope * dy), the output 0."""
    if _skip_gpu_fp64_triton(backend, device, dtype):
        return
    M, K, N = 9, 20, 11
    x = torch.randint(-3, 4, (M, K), device=device).to(dtype)
    w = torch.randint(-2, 3, (N, K), device=device).to(dtype)
    x[4] = x[0]
    x[7] = x[0]
    b = -(x[0].double() @ w.double().t()).to(dtype)  # z[0] = z[4] = z[7] = 0
    z = x.double() @ w.double().t() + b.double()
    assert (z == 0).sum() >= 3 * N and (z > 0).any() and (z < 0).any()
    for dy in (torch.ones(M, N, device=device), torch.randint(-3, 4, (M, N), device=device)):
        got, (dx, dw, db) = compare(backend, x, w, b, slope, dy=dy.to(dtype), tag="z==0", mask_signs=False)
        assert (got[z == 0] == 0).all()
        # rows 0, 4, 7 are all z == 0: there torch's rule gives dx = slope * (dy @ w) and dbias counts
        # slope * dy for each; the truth (float64, where z is 0 too) holds compare() to it
        assert torch.equal(got[[0, 4, 7]], torch.zeros(3, N, device=device, dtype=dtype))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_propagate_like_torch(backend, slope, device):
    """NaN / +-Inf in x and bias: torch's NaN/Inf pattern in y, dx, dweight and dbias."""
    M, K, N = 6, 9, 10
    x = torch.randn(M, K, device=device)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3, K - 1] = float("-inf")
    w = torch.randn(N, K, device=device)
    w[4, 0] = 0.0  # inf * 0: NaN
    b = torch.randn(N, device=device)
    b[N - 1] = float("inf")
    b[5] = float("-inf")
    dy = torch.randn(M, N, device=device)
    got, gg = run(lambda *a: fs_llr(*a, slope), [leaf(t) for t in (x, w, b)], dy, backend)
    eager, ge = run(lambda *a: torch_llr(*a, slope), [leaf(t) for t in (x, w, b)], dy)
    assert not torch.isfinite(eager).all()
    assert_same_nonfinite(got, eager, f"[{backend}] slope={slope} y", atol=1e-5)
    for name, g, e in zip(("dx", "dweight", "dbias"), gg, ge):
        assert_same_nonfinite(g, e, f"[{backend}] slope={slope} {name}", atol=1e-5 * max(1.0, M * K))


# ----------------------------------------------------------------------------- empty
EMPTY = [((0, 5), 4), ((2, 0, 5), 4), ((3, 0), 4), ((3, 5), 0), ((0,), 3), ((0, 0), 0)]


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("xshape,N", EMPTY, ids=[f"{'x'.join(map(str, s))}-N{n}" for s, n in EMPTY])
@pytest.mark.parametrize("device", DEVICES)
def test_empty(backend, slope, xshape, N, device):
    """No rows (M = 0), no inputs (K = 0: y = leaky_relu(bias)), no outputs (N = 0): torch's shapes,
    dtypes and values, gradients included."""
    K = xshape[-1]
    x = torch.randn(xshape, device=device)
    w = torch.randn(N, K, device=device)
    b = torch.randn(N, device=device)
    dy = torch.randn(*xshape[:-1], N, device=device)
    got, gg = run(lambda *a: fs_llr(*a, slope), [leaf(t) for t in (x, w, b)], dy, backend)
    eager, ge = run(lambda *a: torch_llr(*a, slope), [leaf(t) for t in (x, w, b)], dy)
    assert got.shape == eager.shape and got.dtype == eager.dtype
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for name, g, e in zip(("dx", "dweight", "dbias"), gg, ge):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=lambda s: f"{name}: {s}")


# ----------------------------------------------------------------------------- autocast, tf32
def _lowp_rule(got, truth, eager, what, scale=1.0):
    err, err_t = max_err(got, truth), max_err(eager, truth)
    bound = LOWP_RATIO * err_t + LOWP_FLOOR[torch.float16] * scale
    assert err <= bound, f"{what}: max error {err:.3e} > {LOWP_RATIO}x torch's {err_t:.3e} + floor"


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
])
def test_autocast_casts_like_linear(backend, device, dtype):
    """Under autocast the inputs are cast as F.linear casts them: the output in the autocast dtype,
    fp32 parameters' gradients in fp32, values within 2x torch's own error."""
    if device == "cpu" and dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("bf16 through the Triton interpreter is unreliable (GPU only)")
    x, w, b = make((2, 9, 33), 17, device, torch.float32)
    dy = torch.randn(2, 9, 17, device=device)
    lv = lambda: [leaf(t) for t in (x, w, b)]  # noqa: E731

    def under_autocast(fn):
        def f(*a):
            with torch.autocast(device, dtype=dtype):
                return fn(*a, 0.01)
        return f

    got, gg = run(under_autocast(fs_llr), lv(), dy.to(dtype), backend)
    eager, ge = run(under_autocast(torch_llr), lv(), dy.to(dtype))
    assert got.dtype == eager.dtype == dtype
    # the truth: float64 from the inputs rounded to the autocast dtype
    truth, gt = run(lambda *a: torch_llr(*a, 0.01), [leaf(t.to(dtype), torch.float64) for t in (x, w, b)],
                    dy.to(dtype).double())
    _lowp_rule(got, truth, eager, "y")
    for name, g, e, t in zip(("dx", "dweight", "dbias"), gg, ge, gt):
        assert g.dtype == e.dtype == torch.float32, (name, g.dtype, e.dtype)
        _lowp_rule(g, t, e, name, scale=10.0)


@pytest.mark.gpu
def test_fp32_tf32_only_when_allowed():
    """With allow_tf32 off (set by the fixture) fp32 is exact to the tight tolerance at a size where
    tf32 would not be; with it on the error stays within 2x torch's own tf32 error."""
    x, w, b = make((512, 1024), 768, "cuda", torch.float32)
    compare("triton", x, w, b, 0.01, tag="fp32 ieee")
    truth = torch_llr(x.double(), w.double(), b.double(), 0.01)
    torch.backends.cuda.matmul.allow_tf32 = True
    with fusedstab.use_backend("triton"):
        got = fs_llr(x, w, b, 0.01)
    eager = torch_llr(x, w, b, 0.01)
    err, err_t = max_err(got, truth), max_err(eager, truth)
    assert err <= 2 * err_t + 1e-5, (err, err_t)


# ============================================================================= gradcheck
GRADCHECK = [((3, 4), 5, True), ((4,), 3, True), ((2, 3, 4), 2, False), ((3, 1), 2, True)]


@pytest.mark.parametrize("slope", (0.01, -0.3, 1.5))
@pytest.mark.parametrize("xshape,N,has_b", GRADCHECK,
                         ids=[f"{'x'.join(map(str, s))}-N{n}-{'b' if hb else 'nob'}" for s, n, hb in GRADCHECK])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(backend, slope, xshape, N, has_b, device):
    if backend == "triton" and device == "cuda":
        pytest.skip("fp64 matmuls on CUDA are left to cuBLAS (the torch backend)")
    x, w, b = make(xshape, N, device, torch.float64, bias=has_b)
    z = F.linear(x, w, b)
    assert z.abs().min() > 1e-3, "pre-activation too close to the kink for finite differences"
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    with fusedstab.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: fs_llr(*a, negative_slope=slope) if has_b
                                        else fs_llr(a[0], a[1], None, slope),
                                        inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ============================================================================= custom op
# (id, M, K, N, dtype, has bias, x layout)
OP_CASES = [
    ("basic", 5, 7, 3, torch.float32, True, "contiguous"),
    ("nobias", 5, 7, 3, torch.float32, False, "contiguous"),
    ("blocks", 33, 17, 40, torch.float32, True, "contiguous"),
    ("x-transposed", 6, 9, 11, torch.float32, True, "transposed"),
    ("x-row-slice", 6, 9, 11, torch.float32, True, "slice"),
    ("fp16", 4, 16, 9, torch.float16, True, "contiguous"),
    ("fp64", 3, 5, 4, torch.float64, True, "contiguous"),
    ("K1", 4, 1, 5, torch.float32, True, "contiguous"),
    ("M0", 0, 4, 5, torch.float32, True, "contiguous"),
]


def _op_args(case):
    _, M, K, N, dt, has_b, layout = case
    if layout == "transposed":
        x = torch.randn(K, M, device=DEV).t()
    elif layout == "slice":
        x = torch.randn(M, K + 3, device=DEV)[:, 1:K + 1]
    else:
        x = torch.randn(M, K, device=DEV)
    w = torch.randn(N, K, device=DEV) / K ** 0.5
    b = 0.5 * torch.randn(N, device=DEV) if has_b else None
    return x.to(dt), w.to(dt), None if b is None else b.to(dt)


def _skip_op_case(case, backend):
    if backend == "triton" and case[4] == torch.float64 and DEV == "cuda":
        pytest.skip("fp64 matmuls on CUDA go to the torch backend")


@pytest.mark.parametrize("slope", (0.01, -0.3))
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck_fwd(case, slope, op_backend):
    _skip_op_case(case, op_backend)
    x, w, b = _op_args(case)
    torch.library.opcheck(OPS.linear_leaky_relu_fwd, (x, w, b, slope))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_outputs(case, slope, op_backend):
    """y (M, N) contiguous in x's dtype; for slope < 0 the packed sign mask of z = x @ w.T + b
    (uint8 (M, ceil(N/8)), bit j of byte k: column 8k + j > 0), else an empty tensor."""
    _skip_op_case(case, op_backend)
    x, w, b = _op_args(case)
    M, N = x.shape[0], w.shape[0]
    y, mask = OPS.linear_leaky_relu_fwd(x, w, b, slope)
    assert y.shape == (M, N) and y.dtype == x.dtype and y.is_contiguous()
    z = F.linear(x.double(), w.double(), None if b is None else b.double())
    tol = 1e-3 if x.dtype == torch.float16 else 1e-5
    torch.testing.assert_close(y.double(), F.leaky_relu(z, slope), rtol=tol, atol=tol)
    if slope >= 0:
        assert mask.numel() == 0
    else:
        nb = (N + 7) // 8
        assert mask.dtype == torch.uint8 and mask.shape == (M, nb)
        shifts = torch.arange(8, dtype=torch.int32, device=DEV)
        bits = ((mask[:, :, None].to(torch.int32) >> shifts) & 1).reshape(M, nb * 8)
        assert torch.equal(bits[:, :N].bool(), z > 0), "mask bits are not (z > 0)"


# ============================================================================= torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mlp(x, w1, b1, w2):
    h = FS.linear_leaky_relu(x, w1, b1, 0.2)
    return FS.linear_leaky_relu(h, w2, None, -0.3) * 2


def _mlp_torch(x, w1, b1, w2):
    return torch_llr(torch_llr(x, w1, b1, 0.2), w2, None, -0.3) * 2


def _mlp_leaves():
    return [torch.randn(2, 5, 12, device=DEV), torch.randn(9, 12, device=DEV) / 12 ** 0.5, torch.randn(9, device=DEV),
            torch.randn(7, 9, device=DEV) / 3]


def _run_fn(fn, leaves, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    g = torch.Generator(device=DEV).manual_seed(seed)
    (out * torch.randn(out.shape, generator=g, device=DEV, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    for p, q in zip(a[1], b[1]):
        torch.testing.assert_close(p, q, **tol)


def test_compile_fullgraph_aot_eager_parity(op_backend, fresh_dynamo):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.testing import CompileCounterWithBackend

    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    cnt = CompileCounterWithBackend(aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    leaves = _mlp_leaves()
    eager = _run_fn(_mlp, leaves)
    compiled = _run_fn(torch.compile(_mlp, backend=cnt, fullgraph=True), leaves)
    _assert_same(compiled, eager)
    _assert_same(compiled, _run_fn(_mlp_torch, leaves), rtol=1e-5, atol=1e-5)
    assert cnt.frame_count == 1
    fw = {str(n.target) for gm in graphs["fw"] for n in gm.graph.nodes if n.op == "call_function"}
    bw = {str(n.target) for gm in graphs["bw"] for n in gm.graph.nodes if n.op == "call_function"}
    assert any("fusedstab.linear_leaky_relu_fwd" in t for t in fw), fw
    assert not any("leaky_relu" in t and "fusedstab" not in t for t in fw | bw), fw | bw


def test_compile_dynamic_shapes(fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("aot_eager")
    cf = torch.compile(_mlp, backend=cnt, fullgraph=True, dynamic=True)
    for B, T in ((2, 5), (3, 7), (4, 2)):  # (sizes 0 and 1 are specialized: recompiles)
        leaves = _mlp_leaves()
        leaves[0] = torch.randn(B, T, 12, device=DEV)
        _assert_same(_run_fn(cf, leaves), _run_fn(_mlp, leaves))
    assert cnt.frame_count == 1


def test_compile_inductor(fresh_dynamo):
    leaves = _mlp_leaves()
    with fusedstab.use_backend("triton" if DEV == "cuda" or fs_backend.triton_interpret() else "torch"):
        _assert_same(_run_fn(torch.compile(_mlp, fullgraph=True), leaves), _run_fn(_mlp, leaves), rtol=1e-5, atol=1e-5)


def test_compile_module(fresh_dynamo):
    m = fnn.LinearLeakyReLU(12, 6, negative_slope=-0.3, device=DEV)
    x = torch.randn(3, 12, device=DEV)
    eager = _run_fn(m, [x])
    m.zero_grad()
    compiled = _run_fn(torch.compile(m, backend="aot_eager", fullgraph=True), [x])
    _assert_same(compiled, eager)


# ============================================================================= nn module
def test_module_is_a_linear_with_linears_init():
    assert issubclass(fnn.LinearLeakyReLU, torch.nn.Linear)
    torch.manual_seed(5)
    m = fnn.LinearLeakyReLU(4, 3)
    torch.manual_seed(5)
    t = torch.nn.Linear(4, 3)
    assert m.in_features == 4 and m.out_features == 3 and m.negative_slope == 0.01
    assert [(n, p.shape, p.dtype, p.requires_grad) for n, p in m.named_parameters()] == \
           [(n, p.shape, p.dtype, p.requires_grad) for n, p in t.named_parameters()]
    assert torch.equal(m.weight, t.weight) and torch.equal(m.bias, t.bias), "init differs from nn.Linear's"
    assert list(m.state_dict()) == ["weight", "bias"]
    assert repr(m) == "LinearLeakyReLU(in_features=4, out_features=3, bias=True, negative_slope=0.01)"
    m2 = fnn.LinearLeakyReLU(5, 2, bias=False, negative_slope=-0.3)
    assert m2.bias is None and list(m2.state_dict()) == ["weight"] and m2.negative_slope == -0.3
    assert repr(m2) == "LinearLeakyReLU(in_features=5, out_features=2, bias=False, negative_slope=-0.3)"
    m3 = fnn.LinearLeakyReLU(5, 2, False, 0.2)
    assert m3.bias is None and m3.negative_slope == 0.2


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.float16), ("meta", torch.float32),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_module_factory_kwargs(device, dtype):
    m = fnn.LinearLeakyReLU(4, 3, device=device, dtype=dtype)
    for p in (m.weight, m.bias):
        assert p.dtype == dtype and p.device.type == device


@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("slope", (0.01, -0.3))
def test_module_state_dict_interchange_with_linear(backend, bias, slope):
    """A torch.nn.Linear's state_dict loads into LinearLeakyReLU and back; the outputs and the
    parameters' gradients are those of Linear + leaky_relu."""
    t = torch.nn.Linear(12, 7, bias=bias)
    m = fnn.LinearLeakyReLU(12, 7, bias=bias, negative_slope=slope)
    m.load_state_dict(t.state_dict())
    x = torch.randn(4, 3, 12)
    dy = torch.randn(4, 3, 7)
    with fusedstab.use_backend(backend):
        y = m(x)
        y.backward(dy)
    yt = F.leaky_relu(t(x), slope)
    yt.backward(dy)
    torch.testing.assert_close(y, yt)
    for p, q in zip(m.parameters(), t.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # and back: a fresh Linear takes LinearLeakyReLU's state
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    t2 = torch.nn.Linear(12, 7, bias=bias)
    t2.load_state_dict(m.state_dict())
    with fusedstab.use_backend(backend):
        torch.testing.assert_close(m(x), F.leaky_relu(t2(x), slope))
    with pytest.raises(RuntimeError):  # bias mismatch is refused like Linear refuses it
        fnn.LinearLeakyReLU(12, 7, bias=not bias).load_state_dict(t.state_dict())


def test_module_fp16_params_forward():
    m = fnn.LinearLeakyReLU(16, 8, dtype=torch.float16)
    t = torch.nn.Linear(16, 8, dtype=torch.float16)
    t.load_state_dict(m.state_dict())
    x = torch.randn(5, 16, dtype=torch.float16)
    y = m(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, F.leaky_relu(t(x), 0.01), rtol=2e-3, atol=2e-3)


# ============================================================================= bad input
_X = lambda: torch.randn(3, 4)  # noqa: E731
BAD = [
    ("in_features-mismatch", lambda f: f(_X(), torch.ones(5, 3))),
    ("in_features-mismatch-1d-x", lambda f: f(torch.randn(3), torch.ones(5, 4))),
    ("bias-wrong-size", lambda f: f(_X(), torch.ones(5, 4), torch.ones(3))),
    ("bias-too-long", lambda f: f(_X(), torch.ones(5, 4), torch.ones(6))),
    ("weight-3d", lambda f: f(_X(), torch.ones(1, 5, 4))),
    ("x-0d", lambda f: f(torch.randn(()), torch.ones(5, 4))),
    ("dtype-fp32-x-fp64-w", lambda f: f(_X(), torch.ones(5, 4, dtype=torch.float64))),
    ("dtype-fp16-x-fp32-w", lambda f: f(_X().half(), torch.ones(5, 4))),
    ("dtype-bias-fp64", lambda f: f(_X(), torch.ones(5, 4), torch.ones(5, dtype=torch.float64))),
    ("int-x-int-w", lambda f: f(torch.ones(3, 4, dtype=torch.int64), torch.ones(5, 4, dtype=torch.int64))),
    ("int-x-float-w", lambda f: f(torch.ones(3, 4, dtype=torch.int64), torch.ones(5, 4))),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_like_torch(case):
    _, call = case
    assert_raises_like_torch(lambda: call(torch_llr), lambda: call(fs_llr))


def test_weight_not_2d_raises():
    """weight must be (out_features, in_features): RuntimeError also for a 1-D weight (which
    F.linear would take as a single output feature)."""
    for w in (torch.ones(4), torch.ones(()), torch.ones(1, 5, 4)):
        with pytest.raises(RuntimeError):
            fs_llr(_X(), w)


def test_module_bad_input_raises_like_torch():
    m = fnn.LinearLeakyReLU(4, 3)
    t = torch.nn.Linear(4, 3)
    assert_raises_like_torch(lambda: t(torch.randn(2, 5)), lambda: m(torch.randn(2, 5)))
    assert_raises_like_torch(lambda: t(torch.randn(2, 4, dtype=torch.float64)),
                               lambda: m(torch.randn(2, 4, dtype=torch.float64)))


@pytest.mark.gpu
def test_device_mismatch_raises_like_torch():
    x = torch.randn(3, 4, device="cuda")
    w, b = torch.randn(5, 4), torch.randn(5)
    assert_raises_like_torch(lambda: torch_llr(x, w, b.cuda()), lambda: fs_llr(x, w, b.cuda()))
    assert_raises_like_torch(lambda: torch_llr(x, w.cuda(), b), lambda: fs_llr(x, w.cuda(), b))
    assert_raises_like_torch(lambda: torch_llr(x.cpu(), w.cuda(), b.cuda()), lambda: fs_llr(x.cpu(), w.cuda(), b.cuda()))


def test_reference_matches_torch():
    x, w, b = make((2, 3, 7), 5, "cpu", torch.float64)
    for slope in SLOPES:
        torch.testing.assert_close(reference.linear_leaky_relu(x, w, b, slope), torch_llr(x, w, b, slope),
                                   rtol=0, atol=0)
        torch.testing.assert_close(reference.linear_leaky_relu(x, w, None, slope), torch_llr(x, w, None, slope),
                                   rtol=0, atol=0)


def test_autograd_function_apply(backend):
    from fusedstab.autograd import LinearLeakyReLUFunction

    x, w, b = make((3, 8), 5, "cpu", torch.float32)
    dy = torch.randn(3, 5)
    a = run(lambda *t: LinearLeakyReLUFunction.apply(*t, -0.3), [leaf(t) for t in (x, w, b)], dy, backend)
    f = run(lambda *t: fs_llr(*t, -0.3), [leaf(t) for t in (x, w, b)], dy, backend)
    assert torch.equal(a[0], f[0]) and all(torch.equal(p, q) for p, q in zip(a[1], f[1]))
    torch.testing.assert_close(a[0], torch_llr(x, w, b, -0.3))


# ============================================================================= GPU-only: large
@pytest.mark.gpu
@pytest.mark.parametrize("slope", (0.01, -0.3))
def test_large_bf16_4096(slope):
    """4096 x 4096 x 4096 in bf16 (and a leading batch dim), forward and backward, against a float64
    truth computed on the GPU and eager torch in bf16, by the 2x rule."""
    M, K, N = 4096, 4096, 4096
    x = torch.randn(2, M // 2, K, device="cuda").bfloat16()
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).bfloat16()
    b = (0.5 * torch.randn(N, device="cuda")).bfloat16()
    compare("triton", x, w, b, slope, tag="4096^3")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_large_odd_shapes_gpu(dtype):
    """Sizes that are not multiples of any GPU tile, fp16 and fp32 (ieee)."""
    compare("triton", *make((1000, 1031), 2053, "cuda", dtype), -0.3, tag="odd")
    compare("triton", *make((3, 7, 4097), 513, "cuda", dtype), 0.01, tag="odd-batched")

"""Numerics of fusedstab's LayerNorm / RMSNorm / fused residual-add ops.

Every result is compared with a float64 truth (torch in float64 on float64 copies of the very same
inputs) and with eager torch in the test dtype, by the per-dtype rule in ``helpers`` (fp32/fp64 tight;
fp16/bf16 at most 2x torch's own error). Each test runs on both the ``triton`` backend (on CPU through
the Triton interpreter) and the ``torch`` backend; tests parametrized on device also run on CUDA
under the ``gpu`` mark, where bf16 is checked too.

Shapes are chosen to hit every kernel path under the interpreter while staying small: row lengths
1..4097 (whole-row kernels, with several rows per program and programs that loop over several row
blocks), 12000 (whole-row forward, chunked backward), 20000 and 70001 (chunked forward and backward).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fusedstab
from fusedstab import functional as FS
from fusedstab import reference
from fusedstab.kernels import layer_norm as K

from helpers import DEVICES, assert_matches, assert_same_nonfinite, device_dtypes, leaf

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
LN_EPS = 1e-5


def _rms_eps(dtype):
    return torch.finfo(reference.acc_dtype(dtype)).eps


# ----------------------------------------------------------------------------- calling the ops
def fs_call(op, x, r, w, b, ns):
    """fusedstab, default eps everywhere (rms: None, i.e. torch's default)."""
    if op == "layer_norm":
        return (FS.layer_norm(x, ns, w, b),)
    if op == "rms_norm":
        return (FS.rms_norm(x, ns, w),)
    if op == "add_layer_norm":
        return tuple(FS.add_layer_norm(x, r, ns, w, b))
    if op == "add_rms_norm":
        return tuple(FS.add_layer_norm(x, r, ns, w, None, eps=None, rms=True))
    raise ValueError(op)


def _norm(op, h, ns, w, b, rms_eps=None):
    if op in ("layer_norm", "add_layer_norm"):
        return F.layer_norm(h, ns, w, b, LN_EPS)
    return F.rms_norm(h, ns, w, rms_eps)


def torch_call(op, x, r, w, b, ns):
    """Eager torch in the test dtypes: F.layer_norm / F.rms_norm, with h = x + r first for the add ops.
    The normalized output is returned in x's dtype (fusedstab's contract for a wider residual).
    Where torch has no kernel for the dtype mix (a weight dtype other than h's, e.g. an fp32 h with
    fp16 weights on CPU, or half input with fp32 weights on CUDA) torch runs on h and parameters
    upcast to their common dtype, the output rounded once to x's dtype."""
    h = x if r is None else x + r
    try:
        y = _norm(op, h, ns, w, b)
    except RuntimeError:
        up = h.dtype
        for t in (w, b):
            up = up if t is None else torch.promote_types(up, t.dtype)
        y = _norm(op, h.to(up), ns, None if w is None else w.to(up), None if b is None else b.to(up))
    y = y.to(x.dtype)
    return (y,) if r is None else (y, h)


def truth_call(op, x, r, w, b, ns, h_dtype):
    """The float64 truth on float64 copies of the inputs. h = x + r is rounded to its dtype as the op
    defines it (through the fp32 sum, as the kernels and torch compute it) but passes gradients
    straight through; rms eps is the default of h's dtype, not float64's."""
    h = x if r is None else x + r
    if r is not None and h_dtype != torch.float64:
        exact = h.detach()
        h = h + (exact.to(reference.acc_dtype(h_dtype)).to(h_dtype).double() - exact)
    y = _norm(op, h, ns, w, b, _rms_eps(h_dtype))
    return (y,) if r is None else (y, h)


def cond_scales(op, x, r, w, dy, dh, ns, ymax):
    """Per-row conditioning scales (shaped to broadcast over the outputs) for the tolerance of
    fp32/fp64 results, as computed in float64 from the inputs:

    - y: max(1, max|y|) * k, with k = 1 + |mean| * rstd for LayerNorm (rounding of the mean relative
      to the row's spread: rows of nearly equal values lose digits to the subtraction), 1 for RMSNorm;
    - dx: rstd * max|w * dy| * k (+ max|dh|): dx is a difference of terms of that size, and can be
      far smaller itself (N = 2, RMSNorm over one element);
    - the largest k, for the parameter gradients that sum over rows.
    """
    lead = x.shape[: x.dim() - len(ns)]
    if x.numel() == 0:
        return 1.0, 1.0, 1.0
    with torch.no_grad():
        n = math.prod(ns)
        h = (x.double() if r is None else x.double() + r.double()).reshape(-1, n)
        if "rms" in op:
            rstd = torch.rsqrt(h.square().mean(-1) + _rms_eps(x.dtype))
            k = torch.ones_like(rstd)
        else:
            rstd = torch.rsqrt(h.var(-1, unbiased=False) + LN_EPS)
            k = 1 + h.mean(-1).abs() * rstd
        wdy = dy.double().reshape(-1, n) * (1.0 if w is None else w.double().reshape(-1))
        sdx = rstd * wdy.abs().amax(-1) * k
        if dh is not None:
            sdx = sdx + dh.double().abs().max()
        shape = (*lead, *[1] * len(ns))
        return ((max(1.0, ymax) * k).reshape(shape), sdx.clamp(min=1.0).reshape(shape), k.max().item())


def dx_scale(op, x, r, w, dy, dh, ns):
    """The largest input-gradient scale of cond_scales, as a number."""
    sdx = cond_scales(op, x, r, w, dy, dh, ns, 1.0)[1]
    return sdx.max().item() if isinstance(sdx, torch.Tensor) else sdx


def compare(op, backend, inputs, douts, ns, tag):
    """fusedstab under ``backend`` vs the float64 truth vs eager torch: outputs, then the gradients
    of every input that is given."""
    x, r, w, b = inputs
    h_dtype = x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)
    got, gg = run(lambda *a: fs_call(op, *a, ns), [leaf(t) for t in inputs], douts, backend)
    eager, ge = run(lambda *a: torch_call(op, *a, ns), [leaf(t) for t in inputs], douts)
    truth, gt = run(lambda *a: truth_call(op, *a, ns, h_dtype),
                    [leaf(t, torch.float64) for t in inputs], [d.double() for d in douts])
    ymax = truth[0].abs().max().item() if truth[0].numel() else 1.0
    sy, sdx, kmax = cond_scales(op, x, r, w, douts[0], douts[1] if len(douts) > 1 else None, ns, ymax)
    for name, g, e, t, sc in zip(("y", "h"), got, eager, truth, (sy, None)):
        assert_matches(g, t, e, f"{tag} {name}", scale=sc)
    for name, g, e, t, inp, sc in zip(("dx", "dresidual", "dweight", "dbias"), gg, ge, gt, inputs,
                                      (sdx, sdx, kmax, None)):
        if inp is None:
            assert g is None
            continue
        assert g.dtype == inp.dtype, f"{tag} {name}: dtype {g.dtype} != input's {inp.dtype}"
        if name == "dweight":
            sc = kmax * max(1.0, t.abs().max().item()) if t.numel() else None
        assert_matches(g, t, e, f"{tag} {name}", scale=sc)
    return got, gg


def run(fn, leaves, douts, backend=None):
    """Outputs of fn(*leaves) and the gradients of sum(out * dout) w.r.t. the leaves that are
    tensors requiring grad (None for the others), all run under ``backend`` when given."""
    with fusedstab.use_backend(backend) if backend else contextlib.nullcontext():
        outs = fn(*leaves)
        req = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        gs = iter(torch.autograd.grad(outs, req, douts, allow_unused=False)) if req else iter(())
    grads = [next(gs) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    return [o.detach() for o in outs], grads


def make_inputs(op, lead, ns, dtype, device, wdtype=None, rdtype=None, affine=(True, True)):
    """x, residual, weight, bias (None where not used) in the test dtypes, and the upstream grads."""
    wdtype = wdtype or dtype
    shape = (*lead, *ns)
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    has_r = op.startswith("add_")
    r = torch.randn(shape, device=device).to(rdtype or dtype) if has_r else None
    w = (1 + 0.5 * torch.randn(ns, device=device)).to(wdtype) if affine[0] else None
    b = (0.5 * torch.randn(ns, device=device)).to(wdtype) if affine[1] and "rms" not in op else None
    dy = torch.randn(shape, device=device).to(dtype)
    douts = (dy,)
    if has_r:
        hd = torch.promote_types(dtype, rdtype or dtype)
        douts = (dy, torch.randn(shape, device=device).to(hd))
    return (x, r, w, b), douts


def check_op(op, backend, lead, ns, dtype, device, wdtype=None, rdtype=None, affine=(True, True)):
    """Values and all gradients of one op call: fusedstab vs float64 truth vs eager torch."""
    inputs, douts = make_inputs(op, lead, ns, dtype, device, wdtype, rdtype, affine)
    compare(op, backend, inputs, douts, ns, f"{op}[{backend}] lead={lead} ns={ns} {dtype}")


# ----------------------------------------------------------------------------- values and gradients
# (leading dims, row length): several rows per program, programs looping over several row blocks,
# partial last blocks; 4097 one row per program; 12000 chunked backward; 70001 chunked forward too.
SHAPES = [((5, 17), 1), ((5, 17), 2), ((5, 17), 3), ((5, 17), 7), ((5, 17), 31), ((5, 17), 128),
          ((3, 7), 1023), ((5,), 4097), ((5,), 12000), ((2,), 70001)]


def test_shapes_reach_every_kernel_path():
    """The row lengths above must straddle the kernels' thresholds, or the long-row tests test nothing."""
    ns = [n for _, n in SHAPES]
    assert any(K.MAX_FUSED_BWD < n <= K.MAX_FUSED_FWD for n in ns), "no whole-row fwd + chunked bwd case"
    assert any(n > K.MAX_FUSED_FWD for n in ns), "no chunked-forward case"
    assert any(n > K.LONG_BLOCK and n % K.LONG_BLOCK for n in ns if n > K.MAX_FUSED_BWD)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead,n", SHAPES, ids=[f"N{n}" for _, n in SHAPES])
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_values_and_grads(backend, op, lead, n, device, dtype):
    if n > 16384 and dtype == torch.float64 and device == "cpu" and op.startswith("add_"):
        pytest.skip("fp64 long rows: covered by layer_norm/rms_norm (interpreter time)")
    check_op(op, backend, lead, (n,), dtype, device)


AFFINE = [(True, False), (False, True), (False, False)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("affine", AFFINE, ids=["weight_only", "bias_only", "no_affine"])
@pytest.mark.parametrize("lead,n", [((5, 17), 7), ((3,), 1023), ((3,), 20000), ((2,), 70001)],
                         ids=["N7", "N1023", "N20000", "N70001"])
def test_affine_off(backend, op, affine, lead, n):
    if "rms" in op and affine == (False, True):
        pytest.skip("rms_norm has no bias")
    check_op(op, backend, lead, (n,), torch.float32, "cpu", affine=affine)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead,ns", [((2, 4), (3, 5)), ((3,), (2, 3, 7)), ((), (4, 33)), ((2, 1, 3), (6,))],
                         ids=["2x4-3x5", "3-2x3x7", "none-4x33", "2x1x3-6"])
@pytest.mark.parametrize("device,dtype", device_dtypes(gpu_dtypes=(torch.float32, torch.bfloat16)))
def test_multi_dim_shapes(backend, op, lead, ns, device, dtype):
    check_op(op, backend, lead, ns, dtype, device)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [31, 4097, 20000])
@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.float16, id="cpu-fp16"),
                                          pytest.param("cuda", torch.float16, id="cuda-fp16",
                                                       marks=pytest.mark.gpu),
                                          pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                                                       marks=pytest.mark.gpu)])
def test_fp32_weight_low_precision_input(backend, op, n, device, dtype):
    """Weights in fp32 with fp16/bf16 input (mixed precision): output in the input's dtype,
    weight gradients in fp32."""
    check_op(op, backend, (3,), (n,), dtype, device, wdtype=torch.float32)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("n", [31, 20000])
@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.float16, id="cpu-fp16"),
                                          pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                                                       marks=pytest.mark.gpu)])
def test_fp32_residual_low_precision_input(backend, op, n, device, dtype):
    """A residual stream kept in fp32 with fp16/bf16 x: h = x + residual is fp32, y has x's dtype."""
    check_op(op, backend, (3,), (n,), dtype, device, rdtype=torch.float32)


def test_reference_matches_torch_float64():
    """The reference that the torch backend serves calls with is torch's formula."""
    x = torch.randn(6, 37, dtype=torch.float64)
    r = torch.randn(6, 37, dtype=torch.float64)
    w, b = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    torch.testing.assert_close(reference.layer_norm(x, (37,), w, b), F.layer_norm(x, (37,), w, b),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(reference.rms_norm(x, (37,), w), F.rms_norm(x, (37,), w),
                               rtol=1e-13, atol=1e-13)
    y, h = reference.add_layer_norm(x, r, (37,), w, b)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, F.layer_norm(x + r, (37,), w, b), rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- gradcheck
GRADCHECK_CASES = [((4,), (5,)), ((2, 3), (2, 3)), ((3,), (1,))]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead,ns", GRADCHECK_CASES, ids=["4-5", "2x3-2x3", "3-1"])
@pytest.mark.parametrize("affine", [(True, True), (False, False)], ids=["affine", "plain"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(backend, op, lead, ns, affine, device):
    (x, r, w, b), _ = make_inputs(op, lead, ns, torch.float64, device, affine=affine)
    inputs = [t.requires_grad_() for t in (x, r, w, b) if t is not None]
    has_r, has_w, has_b = r is not None, w is not None, b is not None

    def fn(*args):
        it = iter(args)
        xx = next(it)
        rr = next(it) if has_r else None
        ww = next(it) if has_w else None
        bb = next(it) if has_b else None
        return fs_call(op, xx, rr, ww, bb, ns)

    with fusedstab.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [19, 1])
def test_gradcheck_chunked_kernels(monkeypatch, backend, op, n):
    """The chunked (long-row) kernels in float64 at a tiny chunk length: several chunks, a partial
    last one, and more rows than backward programs (the per-program partial sums accumulate)."""
    monkeypatch.setattr(K, "MAX_FUSED_FWD", 0)
    monkeypatch.setattr(K, "MAX_FUSED_BWD", 0)
    monkeypatch.setattr(K, "LONG_BLOCK", 8)
    (x, r, w, b), _ = make_inputs(op, (5,), (n,), torch.float64, "cpu")
    inputs = [t.requires_grad_() for t in (x, r, w, b) if t is not None]
    has_r, has_b = r is not None, b is not None

    def fn(*args):
        it = iter(args)
        xx = next(it)
        rr = next(it) if has_r else None
        ww = next(it)
        bb = next(it) if has_b else None
        return fs_call(op, xx, rr, ww, bb, (n,))

    with fusedstab.use_backend("triton"):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [37, 4096, 4097])
def test_chunked_kernels_small_chunks(monkeypatch, backend, op, n):
    """Chunked kernels (forced, chunk 512) against torch in fp32: chunk-combine of the statistics."""
    monkeypatch.setattr(K, "MAX_FUSED_FWD", 0)
    monkeypatch.setattr(K, "MAX_FUSED_BWD", 0)
    monkeypatch.setattr(K, "LONG_BLOCK", 16 if n < 512 else 512)
    check_op(op, "triton", (6,), (n,), torch.float32, "cpu")


# ----------------------------------------------------------------------------- strides
def _strided_x(kind, m, n, device, dtype):
    if kind == "transposed":  # column stride m
        return torch.randn(n, m, device=device, dtype=dtype).t()
    if kind == "row_stride":  # rows padded: a slice of wider rows
        return torch.randn(m, n + 5, device=device, dtype=dtype)[:, 2:n + 2]
    if kind == "every_other":  # x[:, ::2]
        return torch.randn(m, 2 * n, device=device, dtype=dtype)[:, ::2]
    if kind == "expanded_rows":  # row stride 0
        return torch.randn(1, n, device=device, dtype=dtype).expand(m, n)
    if kind == "permuted_3d":  # (2, m//2, n) from a (n, 2, m//2) tensor
        return torch.randn(n, 2, m // 2, device=device, dtype=dtype).permute(1, 2, 0)
    raise ValueError(kind)


STRIDE_KINDS = ["transposed", "row_stride", "every_other", "expanded_rows", "permuted_3d"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", STRIDE_KINDS)
@pytest.mark.parametrize("n", [33, 20000])
@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(backend, op, kind, n, device):
    """Non-contiguous x, residual and upstream gradient give torch's values and gradients."""
    dtype = torch.float32
    m = 6
    x = _strided_x(kind, m, n, device, dtype)
    assert not x.is_contiguous()
    lead = x.shape[:-1]
    r = _strided_x("transposed", m, n, device, dtype).reshape(*lead, n) if op.startswith("add_") else None
    w = 1 + 0.5 * torch.randn(n, device=device)
    b = 0.5 * torch.randn(n, device=device) if "rms" not in op else None
    dy = torch.randn(n, m, device=device).t().reshape(*lead, n)
    douts = (dy,) if r is None else (dy, torch.randn(*lead, n, device=device))
    compare(op, backend, (x, r, w, b), douts, (n,), f"{op}[{backend}] {kind}")


def _strided_param(kind, ns, device, shift=0.0, mult=1.0):
    if kind == "every_other":  # a view of every other element of a buffer
        return (shift + mult * torch.randn(2 * math.prod(ns), device=device))[::2].view(ns)
    if kind == "expanded":  # one value broadcast: stride 0
        return (shift + mult * torch.randn((1,) * len(ns), device=device)).expand(ns)
    if kind == "transposed":  # 2-D parameter, column-major
        return (shift + mult * torch.randn(ns[::-1], device=device)).t()
    raise ValueError(kind)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind,ns", [("every_other", (33,)), ("expanded", (33,)), ("transposed", (3, 11)),
                                     ("every_other", (20000,))], ids=["every_other", "expanded",
                                                                       "transposed2d", "every_other-N20000"])
@pytest.mark.parametrize("device", DEVICES)
def test_strided_weight_and_bias(backend, op, kind, ns, device):
    """Weight and bias that are non-contiguous views (torch accepts any strides)."""
    m = 6
    x = torch.randn(m, *ns, device=device)
    r = torch.randn(m, *ns, device=device) if op.startswith("add_") else None
    w = _strided_param(kind, ns, device, 1.0, 0.5)
    b = _strided_param(kind, ns, device, 0.0, 0.5) if "rms" not in op else None
    assert not w.is_contiguous()
    dy = torch.randn(m, *ns, device=device)
    douts = (dy,) if r is None else (dy, torch.randn(m, *ns, device=device))
    compare(op, backend, (x, r, w, b), douts, ns, f"{op}[{backend}] {kind} weight/bias")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [7, 20000])
@pytest.mark.parametrize("device", DEVICES)
def test_expanded_upstream_gradient(backend, op, n, device):
    """y.sum().backward(): the upstream gradient is an expanded scalar (all strides 0)."""
    x = torch.randn(2, 3, n, device=device)
    r = torch.randn(2, 3, n, device=device) if op.startswith("add_") else None
    w = 1 + 0.5 * torch.randn(n, device=device)
    b = 0.5 * torch.randn(n, device=device) if "rms" not in op else None
    # What sum().backward() feeds the backward of y (and of h, for 2 * h.sum()):
    dy = torch.ones((), device=device).expand(x.shape)
    douts = (dy,) if r is None else (dy, torch.full((), 2.0, device=device).expand(x.shape))
    assert dy.stride() == (0, 0, 0)
    _, grads = compare(op, backend, (x, r, w, b), douts, (n,), f"{op}[{backend}] expanded dy")
    # and through the user's path, which must give the very same gradients
    leaves = [leaf(t) for t in (x, r, w, b)]
    with fusedstab.use_backend(backend):
        outs = fs_call(op, *leaves, (n,))
        (outs[0].sum() if r is None else outs[0].sum() + 2 * outs[1].sum()).backward()
    for t, g in zip(leaves, grads):
        if t is not None:
            assert torch.equal(t.grad, g)


# ----------------------------------------------------------------------------- special rows
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [1, 7, 20000, 70001])
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.float16, torch.bfloat16)))
def test_zero_and_constant_rows(backend, op, n, device, dtype):
    """Rows of zeros and of a constant: zero variance, finite output (the bias, or 0) equal to torch's,
    finite gradients equal to torch's."""
    if n == 70001 and device == "cpu" and dtype != torch.float32:
        pytest.skip("interpreter time")
    rows = torch.stack([torch.zeros(n), torch.full((n,), 3.0), torch.full((n,), -0.5), torch.randn(n)])
    x = rows.to(device=device, dtype=dtype)
    r = torch.zeros_like(x) if op.startswith("add_") else None
    w = (1 + 0.5 * torch.randn(n, device=device)).to(dtype)
    b = (0.5 * torch.randn(n, device=device)).to(dtype) if "rms" not in op else None
    dy = torch.randn(x.shape, device=device).to(dtype)
    douts = (dy,) if r is None else (dy, torch.randn(x.shape, device=device).to(dtype))
    got, grads = compare(op, backend, (x, r, w, b), douts, (n,), f"{op}[{backend}] N={n} {dtype}")
    for t in (*got, *grads):  # (compare checks this too: the truth is finite)
        assert t is None or torch.isfinite(t).all()
    if "rms" in op:  # RMSNorm of a zero row is exactly 0
        assert (got[0][0] == 0).all()


def _nonfinite_rows(n, device):
    x = torch.randn(5, n, device=device)
    x[1, n // 2] = float("nan")
    x[2, 0] = float("inf")
    x[3, n - 1] = float("-inf")
    x[4, 0], x[4, n - 1] = float("inf"), float("-inf")
    return x


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [1, 7, 20000, 70001])
@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_propagate_like_torch(backend, op, n, device):
    """NaN and Inf in a row: the same NaN/Inf pattern as torch, forward and backward; other rows
    stay finite and equal to torch's."""
    x = _nonfinite_rows(n, device)
    r = torch.randn(x.shape, device=device) if op.startswith("add_") else None
    w = 1 + 0.5 * torch.randn(n, device=device)
    b = 0.5 * torch.randn(n, device=device) if "rms" not in op else None
    dy = torch.randn(x.shape, device=device)
    douts = (dy,) if r is None else (dy, torch.randn(x.shape, device=device))
    inputs = (x, r, w, b)
    got, gg = run(lambda *a: fs_call(op, *a, (n,)), [leaf(t) for t in inputs], douts, backend)
    eager, ge = run(lambda *a: torch_call(op, *a, (n,)), [leaf(t) for t in inputs], douts)
    assert torch.isfinite(got[0][0]).all()
    for i, (g, e) in enumerate(zip(got, eager)):
        assert_same_nonfinite(g, e, f"{op}[{backend}] out{i}")
    # Finite gradient entries: within fp32 precision of the terms they sum (as in compare()).
    sdx = dx_scale(op, x.nan_to_num(0.0, 0.0, 0.0), r, w, dy, douts[1] if r is not None else None, (n,))
    for name, g, e, sc in zip(("dx", "dres", "dw", "db"), gg, ge, (sdx, sdx, None, None)):
        if g is not None:
            assert_same_nonfinite(g, e, f"{op}[{backend}] {name}", atol=1e-5 * (sc or 1.0))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,ns", [((0, 7), (7,)), ((2, 0, 5), (5,)), ((0, 20000), (20000,)),
                                      ((0, 3, 5), (3, 5)), ((3, 0), (0,))],
                         ids=["0x7", "2x0x5", "0x20000", "0x3x5", "3x0"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty(backend, op, shape, ns, device):
    """Zero rows (and zero-length rows): empty outputs, empty dx, zero weight/bias gradients, like torch."""
    x = torch.randn(shape, device=device)
    r = torch.randn(shape, device=device) if op.startswith("add_") else None
    w = torch.randn(ns, device=device)
    b = torch.randn(ns, device=device) if "rms" not in op else None
    douts = (torch.randn(shape, device=device),)
    if r is not None:
        douts += (torch.randn(shape, device=device),)
    inputs = (x, r, w, b)
    got, gg = run(lambda *a: fs_call(op, *a, ns), [leaf(t) for t in inputs], douts, backend)
    eager, ge = run(lambda *a: torch_call(op, *a, ns), [leaf(t) for t in inputs], douts)
    for g, e in zip(got, eager):
        assert g.shape == e.shape and g.dtype == e.dtype
    for name, g, e in zip(("dx", "dres", "dw", "db"), gg, ge):
        if g is not None:
            assert g.shape == e.shape and g.dtype == e.dtype, name
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [1, 31, 4097, 20000])
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16),
                                                       (torch.float32, torch.bfloat16)))
def test_single_row(backend, op, n, device, dtype):
    """M = 1: one row, 1-D input."""
    check_op(op, backend, (), (n,), dtype, device)
    check_op(op, backend, (1,), (n,), dtype, device)


# ----------------------------------------------------------------------------- determinism, eps
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("m,n", [(200, 31), (9, 20000)])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(backend, op, m, n, device):
    """Two backward runs give bitwise identical dx, dweight, dbias (no atomics; fixed reduction order)."""
    x = torch.randn(m, n, device=device)
    r = torch.randn(m, n, device=device) if op.startswith("add_") else None
    w = 1 + 0.5 * torch.randn(n, device=device)
    b = 0.5 * torch.randn(n, device=device) if "rms" not in op else None
    douts = (torch.randn(m, n, device=device),)
    if r is not None:
        douts += (torch.randn(m, n, device=device),)
    inputs = (x, r, w, b)
    (o1, g1), (o2, g2) = [run(lambda *a: fs_call(op, *a, (n,)), [leaf(t) for t in inputs], douts, backend)
                          for _ in range(2)]
    for a, c in zip(o1, o2):
        assert torch.equal(a, c)
    for name, a, c in zip(("dx", "dres", "dw", "db"), g1, g2):
        if a is not None:
            assert torch.equal(a, c), f"{name} differs between two identical backward runs"


@pytest.mark.parametrize("n", [16, 20000])
@pytest.mark.parametrize("device,dtype", device_dtypes((torch.float32, torch.float16, torch.float64),
                                                       (torch.float32, torch.float16, torch.bfloat16)))
def test_rms_norm_default_eps_is_torchs(backend, n, device, dtype):
    """eps=None is torch's default: the machine epsilon of the accumulation dtype (fp32 for
    fp16/bf16). Inputs are tiny, so a different eps (e.g. finfo(fp16).eps) shows in the output."""
    x = (1e-3 * torch.randn(3, n, device=device)).to(dtype)
    w = (1 + 0.5 * torch.randn(n, device=device)).to(dtype)
    with fusedstab.use_backend(backend):
        got = FS.rms_norm(x, (n,), w)
        got_explicit = FS.rms_norm(x, (n,), w, eps=_rms_eps(dtype))
        y_add, _ = FS.add_layer_norm(x, torch.zeros_like(x), (n,), w, eps=None, rms=True)
    exp = F.rms_norm(x, (n,), w)
    assert torch.equal(got, got_explicit)
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(y_add, exp)
    # The check can fail: a larger eps visibly changes the output for these inputs.
    other = F.rms_norm(x, (n,), w, eps=1e-5)
    assert not torch.allclose(other.double(), exp.double(), rtol=1e-2, atol=1e-2)

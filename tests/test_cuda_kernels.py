"""The ``cuda`` backend's kernels on a GPU (marked ``gpu``; skipped elsewhere): LayerNorm / RMSNorm /
add + norm, bias + Leaky ReLU, and the multi-tensor norm and scale of the clip.

Each case runs the same inputs through ``cuda``, ``triton`` and eager torch: values and gradients
against a float64 truth by the per-dtype rule of ``helpers.assert_matches`` (fp16/bf16: at most 2x
torch's own error), and ``cuda`` against ``triton``. Shapes straddle the kernels' configurations
(csrc/cuda/layer_norm.cu: threads per row 1..512, 1/2/4 groups of 8 columns per thread, the long-row
kernels past 16K elements forward and 8K backward), rows whose length is not a multiple of 8 (the
element-by-element path), strided and misaligned rows, tensors over 2^31 elements (when the GPU has
the memory), and bitwise determinism. The op tests of tests/test_layer_norm.py, test_bias_leaky_relu.py
and test_clip_grad.py (sync-free clip, CUDA-graph capture) also run on this backend with
``FUSEDSTAB_TEST_BACKENDS=cuda`` (benchmarks/gpu_cuda_stage.sh does).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedstab
from fusedstab import functional as FF
from fusedstab import reference
from helpers import assert_matches, max_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_ext")]
DEV = "cuda"
LOWP = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


def _grads(fn, leaves, dy, backend):
    """Outputs (fn may return a tuple, then dy is a tuple too) and the gradients of sum(out * dy)
    w.r.t. the leaves that require grad, under backend."""
    with fusedstab.use_backend(backend):
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        req = [t for t in leaves if t is not None and t.requires_grad]
        gs = torch.autograd.grad(outs, req, dy if isinstance(dy, tuple) else (dy,))
    return [o.detach() for o in outs] + list(gs)


# ============================================================================ LayerNorm family
# N chosen around the configurations: 1, tiny, not a multiple of 8, one warp, several warps, 512
# threads x 4 groups (16K, the last cached forward row), 8K (the last cached backward row), long rows.
LN_SHAPES = [(1, 1), (3, 7), (37, 64), (5, 199), (64, 768), (7, 1000), (3, 4096), (2, 5003), (3, 8192),
             (2, 8200), (2, 16384), (2, 16391), (1, 65536 + 8)]


def _ln_inputs(M, N, dtype, pdtype, residual, weight, bias, stride_pad=0):
    g = _gen(M * 7919 + N)
    base = (torch.randn(M, N + stride_pad, device=DEV, generator=g) * 2 + 0.5).to(dtype)
    x = base[:, :N]  # strided rows when stride_pad
    r = (torch.randn(M, N, device=DEV, generator=g).to(residual) if residual else None)
    w = torch.randn(N, device=DEV, generator=g).to(pdtype) if weight else None
    b = torch.randn(N, device=DEV, generator=g).to(pdtype) if bias else None
    dy = torch.randn(M, N, device=DEV, generator=g).to(dtype)
    return [t.requires_grad_() if t is not None else None for t in (x, r, w, b)], dy


def _ln_fn(rms, residual):
    def fn(x, r, w, b):
        if residual:
            return FF.add_layer_norm(x, r, (x.shape[-1],), w, b, 1e-5, rms)  # (y, h)
        if rms:
            return FF.rms_norm(x, (x.shape[-1],), w, 1e-5)
        return FF.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    return fn


def _ln_torch(rms, residual):
    """Eager torch: h = x + r (promoted), the norm in h's dtype with the parameters cast to it, y
    rounded to x's dtype (fusedstab's contract)."""
    def fn(x, r, w, b):
        h = x + r if residual else x
        w_, b_ = (None if p is None else p.to(h.dtype) for p in (w, b))
        y = (F.rms_norm(h, (h.shape[-1],), w_, 1e-5) if rms else F.layer_norm(h, (h.shape[-1],), w_, b_, 1e-5))
        return (y.to(x.dtype), h) if residual else y.to(x.dtype)
    return fn


def _check_ln(M, N, dtype, pdtype, rms, residual, weight=True, bias=True, stride_pad=0):
    bias = bias and not rms
    leaves, dy = _ln_inputs(M, N, dtype, pdtype, residual, weight, bias, stride_pad)
    if residual:
        dy = (dy, torch.randn(M, N, device=DEV).to(torch.promote_types(dtype, residual)))
    dy64 = tuple(d.double() for d in dy) if residual else dy.double()
    fn, ref = _ln_fn(rms, residual), _ln_torch(rms, residual)
    got = _grads(fn, leaves, dy, "cuda")
    tri = _grads(fn, leaves, dy, "triton")
    l64 = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    truth = _grads(ref, l64, dy64, "torch")
    eager = _grads(ref, leaves, dy, "torch")
    names = ["y", "h"][:1 + bool(residual)] + [n for n, t in zip(("dx", "dres", "dw", "db"), leaves) if t is not None]
    for n, c, t, e, tr in zip(names, got, truth, eager, tri, strict=True):
        what = f"{'rms' if rms else 'ln'}{'+res' if residual else ''} {n} M={M} N={N} {dtype}"
        assert_matches(c, t, e, what)
        assert_matches(tr, t, e, what + " (triton, same inputs)")
        assert c.dtype == tr.dtype and c.shape == tr.shape


@pytest.mark.parametrize("M,N", LN_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_layer_norm_shapes(M, N, rms):
    _check_ln(M, N, torch.bfloat16, torch.float32, rms, residual=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pdtype", ["same", "fp32"])
@pytest.mark.parametrize("residual", [None, "same", "fp32"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_layer_norm_dtypes(dtype, pdtype, residual, rms):
    if dtype not in LOWP and "fp32" in (pdtype, residual):
        pytest.skip("fp32 parameters / residual are the mixed-precision case of fp16/bf16 input")
    pd = dtype if pdtype == "same" else torch.float32
    rd = None if residual is None else (dtype if residual == "same" else torch.float32)
    for M, N in ((37, 768), (6, 1001), (2, 9000)):
        _check_ln(M, N, dtype, pd, rms, residual=rd)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_layer_norm_optional_params(weight, bias):
    _check_ln(19, 1024, torch.float16, torch.float16, False, None, weight, bias)
    _check_ln(3, 12000, torch.float16, torch.float16, False, None, weight, bias)


@pytest.mark.parametrize("pad", [1, 8, 13])
def test_layer_norm_strided_rows(pad):
    """Rows with a row stride other than N: 16-byte loads only where every row stays aligned."""
    for M, N in ((33, 512), (4, 10000)):
        _check_ln(M, N, torch.bfloat16, torch.bfloat16, False, torch.bfloat16, stride_pad=pad)


def test_layer_norm_misaligned_base():
    """A storage offset of one element: the element-by-element path, same numbers."""
    x = torch.randn(4 * 1024 + 1, device=DEV)[1:].view(4, 1024).requires_grad_()
    w = torch.randn(1024, device=DEV, requires_grad=True)
    dy = torch.randn(4, 1024, device=DEV)
    fn = lambda x, w: FF.layer_norm(x, (1024,), w, None)  # noqa: E731
    a = _grads(fn, [x, w], dy, "cuda")
    b = _grads(fn, [x.detach().clone().requires_grad_(), w], dy, "cuda")
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("M,N", [(4096, 768), (64, 10000), (3000, 64)])
def test_layer_norm_deterministic(M, N):
    """Backward twice on the same inputs: dx, dweight, dbias bit for bit (no atomics)."""
    leaves, dy = _ln_inputs(M, N, torch.bfloat16, torch.float32, None, True, True)
    fn = _ln_fn(False, None)
    assert len(_grads(fn, leaves, dy, "cuda")) == 4
    a = _grads(fn, leaves, dy, "cuda")
    b = _grads(fn, leaves, dy, "cuda")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_layer_norm_over_2_31_elements():
    """int64 offsets: 2^31 + 4096 bf16 elements (rows far past 2^31 / N), checked on the last rows."""
    N = 4096
    M = 2**31 // N + 1
    if _free_bytes() < 5 * M * N * 2 + (1 << 30):
        pytest.skip("needs about 22 GB of free GPU memory")
    x = torch.empty(M, N, device=DEV, dtype=torch.bfloat16).normal_().requires_grad_()
    w = torch.randn(N, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    with fusedstab.use_backend("cuda"):
        y = FF.layer_norm(x, (N,), w, None)
        (dx,) = torch.autograd.grad(y, x, y)  # dy = y: no second big random tensor
    tail = x.detach()[-3:]
    ref = F.layer_norm(tail.double(), (N,), w.detach().double())
    assert max_err(y[-3:], ref) < 0.02 * max(1.0, ref.abs().max().item())  # bf16: 2^-8 relative
    xd = tail.double().requires_grad_()
    yd = F.layer_norm(xd, (N,), w.detach().double())
    (gd,) = torch.autograd.grad(yd, xd, y[-3:].double())
    assert max_err(dx[-3:], gd) < 0.05 * max(1.0, gd.abs().max().item())
    del x, y, dx
    torch.cuda.empty_cache()


# ============================================================================ bias + Leaky ReLU
BLR_CASES = [  # (shape, dim): dim=-1 a per-column bias, dim=1 of NCHW a per-row one
    ((1, 1), -1), ((3, 5), -1), ((37, 768), -1), ((64, 1001), -1), ((2, 3, 7, 7), 1), ((4, 64, 56, 56), 1),
    ((8, 24, 5), 1), ((2, 40000), -1),
]


def _blr_check(shape, dim, dtype, bdtype, slope, channels_last=False):
    g = _gen(sum(shape))
    x = torch.randn(shape, device=DEV, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[dim]
    b = torch.randn(C, device=DEV, generator=g).to(bdtype)
    x.requires_grad_(), b.requires_grad_()
    dy = torch.randn(shape, device=DEV, generator=g).to(torch.promote_types(dtype, bdtype))
    fn = lambda x, b: FF.bias_leaky_relu(x, b, slope, dim)  # noqa: E731
    got = _grads(fn, [x, b], dy, "cuda")
    tri = _grads(fn, [x, b], dy, "triton")
    x64, b64 = (t.detach().double().requires_grad_() for t in (x, b))
    truth = _grads(lambda x, b: reference.bias_leaky_relu(x, b, slope, dim), [x64, b64], dy.double(), "torch")
    eager = _grads(lambda x, b: reference.bias_leaky_relu(x, b, slope, dim), [x, b], dy, "torch")
    for n, c, t, e, tr in zip(("y", "dx", "db"), got, truth, eager, tri):
        what = f"bias_leaky_relu {n} {shape} dim={dim} slope={slope}"
        assert_matches(c, t, e, what)
        assert_matches(tr, t, e, what + " (triton)")


@pytest.mark.parametrize("shape,dim", BLR_CASES, ids=str)
@pytest.mark.parametrize("slope", [0.01, -0.2, 0.0])
def test_bias_leaky_relu_shapes(shape, dim, slope):
    _blr_check(shape, dim, torch.bfloat16, torch.bfloat16, slope)


@pytest.mark.parametrize("dtype,bdtype", [(d, d) for d in DTYPES] + [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64),
    (torch.float16, torch.bfloat16)], ids=str)
def test_bias_leaky_relu_dtypes(dtype, bdtype):
    _blr_check((37, 1000), -1, dtype, bdtype, -0.1)
    _blr_check((3, 16, 9, 9), 1, dtype, bdtype, 0.2)
    _blr_check((3, 16, 9, 9), 1, dtype, bdtype, 0.2, channels_last=True)


def test_bias_leaky_relu_deterministic():
    x = torch.randn(4096, 3072, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(3072, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    fn = lambda x, b: FF.bias_leaky_relu(x, b, -0.1)  # noqa: E731
    a, c = _grads(fn, [x, b], dy, "cuda"), _grads(fn, [x, b], dy, "cuda")
    for u, v in zip(a, c):
        assert torch.equal(u, v)


def test_bias_leaky_relu_over_2_31_elements():
    R, L = 2**31 // 1024 + 3, 1024
    if _free_bytes() < 3 * R * L * 2 + (1 << 30):
        pytest.skip("needs about 14 GB of free GPU memory")
    x = torch.empty(R, L, device=DEV, dtype=torch.bfloat16).normal_()
    b = torch.randn(L, device=DEV, dtype=torch.bfloat16)
    with fusedstab.use_backend("cuda"):
        y = FF.bias_leaky_relu(x, b, 0.01)
    tail = x[-5:].float() + b.float()
    torch.testing.assert_close(y[-5:].float(), torch.where(tail > 0, tail, tail * 0.01), rtol=1e-2, atol=1e-2)


# ============================================================================ multi-tensor norm / scale
_ops = torch.ops.fusedstab
NORMS = [2.0, 1.0, float("inf"), float("-inf"), 0.0, 3.5, 0.5]


def _tensor_list(dtype, sizes, seed=0):
    g = _gen(seed)
    out = []
    for i, s in enumerate(sizes):
        t = torch.randn(s + (i % 3 == 1), device=DEV, generator=g).to(dtype)
        out.append(t[1:] if i % 3 == 1 else t)  # every third one starts one element in: misaligned
    for t in out:
        if t.numel() > 10:
            t[::7] = 0  # zeros for the nonzero count
    return out


SIZES = [1, 7, 0, 4096, 32768, 32769, 100003, 3, 65536 * 3 + 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", NORMS, ids=str)
def test_multi_tensor_norm(dtype, p):
    ts = _tensor_list(dtype, SIZES)
    if p < 0 or p == float("inf"):
        ts = [t for t in ts if t.numel()]  # no identity: refused on an empty tensor by the callers anyway
    with fusedstab.use_backend("cuda"):
        got = _ops.multi_tensor_norm(ts, p)
    with fusedstab.use_backend("triton"):
        tri = _ops.multi_tensor_norm(ts, p)
    truth = reference.multi_tensor_norm([t.double() for t in ts], p)
    assert got.dtype == tri.dtype and got.shape == (len(ts),)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), truth, rtol=rtol, atol=0)
    torch.testing.assert_close(got, tri, rtol=rtol, atol=0)


@pytest.mark.parametrize("n", [1000, 1100])
def test_multi_tensor_norm_long_lists(n):
    """1000 tensors: one launch (1024 tensors of parameters); 1100: two launches."""
    ts = _tensor_list(torch.float32, [(37 * i) % 5000 for i in range(n)], seed=3)
    with fusedstab.use_backend("cuda"):
        got = _ops.multi_tensor_norm(ts, 2.0)
    truth = reference.multi_tensor_norm([t.double() for t in ts], 2.0)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=0)


def test_multi_tensor_norm_nan_inf():
    ts = _tensor_list(torch.bfloat16, [5000, 70000, 9])
    ts[1][40000] = float("nan")
    ts[2][3] = float("inf")
    for p in (2.0, float("inf"), float("-inf"), 1.0):
        with fusedstab.use_backend("cuda"):
            got = _ops.multi_tensor_norm(ts, p)
        truth = reference.multi_tensor_norm([t.double() for t in ts], p)
        assert torch.equal(torch.isnan(got), torch.isnan(truth)) and torch.equal(torch.isinf(got), torch.isinf(truth))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_nonfinite", [False, True])
def test_multi_tensor_scale(dtype, zero_nonfinite):
    ts = _tensor_list(dtype, SIZES)
    ts[3][5] = float("nan")
    expect = [t.clone() for t in ts]
    for coef in (0.37, 0.0):
        c = torch.tensor(coef, device=DEV)
        got = [t.clone() for t in ts]
        with fusedstab.use_backend("cuda"):
            _ops.multi_tensor_scale_(got, c, zero_nonfinite)
        with fusedstab.use_backend("triton"):
            _ops.multi_tensor_scale_(expect, c, zero_nonfinite)
        for a, b in zip(got, expect):
            assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)
        expect = [t.clone() for t in ts]


def test_multi_tensor_norm_over_2_31_elements():
    n = 2**31 + 1001
    if _free_bytes() < n * 2 + (1 << 30):
        pytest.skip("needs about 5 GB of free GPU memory")
    t = torch.full((n,), 0.5, device=DEV, dtype=torch.bfloat16)
    t[-1] = 3.0
    with fusedstab.use_backend("cuda"):
        got = _ops.multi_tensor_norm([t], 2.0)
        mx = _ops.multi_tensor_norm([t], float("inf"))
    assert got.item() == pytest.approx(0.25 * (n - 1) + 9.0, rel=1e-5)
    assert mx.item() == 3.0


def test_clip_no_sync_and_graph_capture():
    """The whole clip on the cuda backend: no host sync after a warm-up, and a CUDA graph replays it
    bit for bit."""
    from fusedstab import utils as FU

    ps = []
    for i, (s, dt) in enumerate([(768, torch.float32), (50257 * 64, torch.bfloat16), (3, torch.float32),
                                 (4096, torch.bfloat16)] * 4):
        p = torch.zeros(s, device=DEV, dtype=dt, requires_grad=True)
        p.grad = torch.randn(s, device=DEV, dtype=dt)
        ps.append(p)
    saved = [p.grad.clone() for p in ps]
    mx = torch.tensor(0.5, device=DEV)
    with fusedstab.use_backend("cuda"):
        FU.clip_grad_norm_(ps, mx)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            FU.clip_grad_norm_(ps, mx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for p, s in zip(ps, saved):
            p.grad.copy_(s)
        eager_total = FU.clip_grad_norm_(ps, mx)
        eager = [p.grad.clone() for p in ps]
        for p, s in zip(ps, saved):
            p.grad.copy_(s)
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            FU.clip_grad_norm_(ps, mx)
        torch.cuda.current_stream().wait_stream(st)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            total = FU.clip_grad_norm_(ps, mx)
        for p, s in zip(ps, saved):
            p.grad.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(total, eager_total)
    for p, e in zip(ps, eager):
        assert torch.equal(p.grad, e)

"""API-level tests of the LayerNorm / RMSNorm ops: custom-op contracts (opcheck), torch.compile
capture and parity, nn module drop-ins for torch.nn, drop-in argument semantics, and the errors torch
raises for bad input. Numerics (dtypes, odd shapes, gradcheck, ...) live in test_layer_norm.py.

Triton kernels run on CPU through the Triton interpreter (tests/conftest.py); on a GPU machine the
tensors are CUDA tensors and the kernels compiled ones.
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.nn.functional as TF

import fusedstab
import fusedstab.functional as F
import fusedstab.nn as fnn

from helpers import assert_raises_like_torch, graph_recorder

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.fusedstab


@pytest.fixture
def backend(request):
    """Run the test body with fusedstab backend ``request.param`` explicitly chosen (parametrized by
    tests/conftest.py)."""
    with fusedstab.use_backend(request.param):
        yield request.param


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_(requires_grad)


# =============================================================================== 1. opcheck
# Sample arguments for fusedstab::layer_norm_fwd(x, weight, bias, residual, eps, rms):
# (id, M, N, x dtype, param dtype, residual dtype, has_w, has_b, has_r, rms, row stride pad)
_FWD_CASES = []
for _rms in (False, True):
    for _w in (False, True):
        for _b in ((False,) if _rms else (False, True)):
            for _r in (False, True):
                _FWD_CASES.append((f"{'rms' if _rms else 'ln'}-w{int(_w)}-b{int(_b)}-r{int(_r)}",
                                   5, 7, torch.float32, torch.float32, torch.float32, _w, _b, _r, _rms, 0))
_FWD_CASES += [
    # fp16 input, fp32 weight and residual (h promoted to fp32), rows strided (a view of wider rows)
    ("ln-fp16x-fp32wr-strided", 6, 33, torch.float16, torch.float32, torch.float32, True, True, True, False, 3),
    ("rms-fp64", 3, 16, torch.float64, torch.float64, torch.float64, True, False, True, True, 0),
    ("ln-empty-rows", 0, 8, torch.float32, torch.float32, torch.float32, True, True, True, False, 0),
    ("ln-one-col", 4, 1, torch.float32, torch.float32, torch.float32, True, True, False, False, 0),
]


def _fwd_args(case):
    _, M, N, xd, pd, rd, has_w, has_b, has_r, rms, pad = case
    x = _rand(M, N + pad, dtype=xd)[:, :N]
    w = _rand(N, dtype=pd) if has_w else None
    b = _rand(N, dtype=pd) if has_b else None
    r = _rand(M, N, dtype=rd) if has_r else None
    return (x, w, b, r, 1e-5, rms)


@pytest.mark.parametrize("case", _FWD_CASES, ids=[c[0] for c in _FWD_CASES])
def test_opcheck_layer_norm_fwd(case, backend):
    args = _fwd_args(case)
    assert not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    torch.library.opcheck(OPS.layer_norm_fwd, args)


@pytest.mark.parametrize("has_dh", (False, True), ids=("no_dh", "dh"))
@pytest.mark.parametrize("case", _FWD_CASES, ids=[c[0] for c in _FWD_CASES])
def test_opcheck_layer_norm_bwd(case, has_dh, backend):
    x, w, b, r, eps, rms = _fwd_args(case)
    y, h, mean, rstd = OPS.layer_norm_fwd(x, w, b, r, eps, rms)
    h_saved = x if r is None else h  # what autograd saves: the normalized rows
    dy = _rand(*y.shape, dtype=y.dtype)
    dh = _rand(*h_saved.shape, dtype=h_saved.dtype) if has_dh else None
    torch.library.opcheck(OPS.layer_norm_bwd, (dy, h_saved, w, b, mean, rstd, dh, rms))


@pytest.mark.parametrize("rms", (False, True), ids=("ln", "rms"))
def test_op_output_contract(rms, backend):
    """Documented outputs: contiguous; the optional ones that do not apply are empty tensors;
    statistics in the accumulation dtype; h in the promoted dtype of x and residual."""
    M, N = 4, 10
    x = _rand(M, 2 * N, dtype=torch.float16)[:, ::2]  # strided columns
    w = _rand(N)
    b = None if rms else _rand(N)
    y, h, mean, rstd = OPS.layer_norm_fwd(x, w, b, None, 1e-5, rms)
    assert y.shape == (M, N) and y.dtype == torch.float16 and y.is_contiguous()
    assert h.numel() == 0
    assert rstd.shape == (M,) and rstd.dtype == torch.float32
    assert mean.numel() == 0 if rms else (mean.shape == (M,) and mean.dtype == torch.float32)

    r = _rand(M, N)
    y, h, mean, rstd = OPS.layer_norm_fwd(x, w, b, r, 1e-5, rms)
    assert h.shape == (M, N) and h.dtype == torch.float32 and h.is_contiguous()
    torch.testing.assert_close(h, x.float() + r)

    dx, dw, db = OPS.layer_norm_bwd(_rand(M, N, dtype=torch.float16), h, None, None, mean, rstd, None, rms)
    assert dx.shape == (M, N) and dx.dtype == h.dtype and dx.is_contiguous()
    assert dw.numel() == 0 and db.numel() == 0
    dx, dw, db = OPS.layer_norm_bwd(_rand(M, N, dtype=torch.float16), h, w, b, mean, rstd, None, rms)
    assert dw.shape == w.shape and dw.dtype == w.dtype
    assert db.numel() == 0 if rms else (db.shape == b.shape and db.dtype == b.dtype)


# =============================================================================== 2. torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fn_layer_norm(x, r, w, b):
    return (F.layer_norm(x, x.shape[-1:], w, b, 1e-5),)


def _fn_rms_norm(x, r, w, b):
    return (F.rms_norm(x, x.shape[-1:], w),)


def _fn_add_layer_norm(x, r, w, b):
    return F.add_layer_norm(x, r, x.shape[-1:], w, b)


def _fn_add_rms_norm(x, r, w, b):
    return F.add_layer_norm(x, r, x.shape[-1:], w, None, eps=None, rms=True)


def _fn_chain(x, r, w, b):
    """Several ops in one graph, the output of one the input of the next."""
    y, h = F.add_layer_norm(x, r, x.shape[-1:], w, b)
    return (F.layer_norm(y * 2, x.shape[-1:], w, b) + F.rms_norm(h, x.shape[-1:], w),)


_COMPILE_FNS = [_fn_layer_norm, _fn_rms_norm, _fn_add_layer_norm, _fn_add_rms_norm, _fn_chain]


def _leaves(M=6, N=24, lead=(2,)):
    x = _rand(*lead, M, N, requires_grad=True)
    r = _rand(*lead, M, N, requires_grad=True)
    w = _rand(N, requires_grad=True)
    b = _rand(N, requires_grad=True)
    return [x, r, w, b]


def _run(fn, leaves, seed=1):
    """Outputs and the gradients of every leaf (None where it gets none) for a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    g = torch.Generator(device=DEV).manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, device=DEV, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _assert_same_run(a, b, **tol):
    (oa, ga), (ob, gb) = a, b
    assert len(oa) == len(ob)
    for x, y in zip(oa, ob):
        torch.testing.assert_close(x, y, **tol)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, **tol)


def _targets(gms):
    return {str(n.target) for gm in gms for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("fn", _COMPILE_FNS, ids=lambda f: f.__name__[4:])
def test_compile_fullgraph_functional_parity(fn, backend, fresh_dynamo):
    """fullgraph capture (no graph break), one graph, and the same outputs and gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("aot_eager")
    leaves = _leaves()
    eager = _run(fn, leaves)
    compiled = _run(torch.compile(fn, backend=cnt, fullgraph=True), leaves)
    _assert_same_run(compiled, eager)
    assert cnt.frame_count == 1
    # Called again: no recompilation.
    _run(torch.compile(fn, backend=cnt, fullgraph=True), leaves)
    assert cnt.frame_count == 1


def test_compile_graph_holds_the_custom_ops(fresh_dynamo):
    """Forward and backward graphs call fusedstab's ops (opaque, with their fake functions), not a
    decomposition, an inlined kernel or an eager fallback."""
    be, graphs = graph_recorder()
    leaves = _leaves()
    compiled = _run(torch.compile(_fn_chain, backend=be, fullgraph=True), leaves)
    _assert_same_run(compiled, _run(_fn_chain, leaves))
    fw, bw = _targets(graphs["fw"]), _targets(graphs["bw"])
    assert any("fusedstab.layer_norm_fwd" in t for t in fw), fw
    assert any("fusedstab.layer_norm_bwd" in t for t in bw), bw
    assert not any("native_layer_norm" in t or "rms_norm" in t for t in fw | bw), fw | bw


@pytest.mark.parametrize("make", [
    lambda: fnn.LayerNorm(24, device=DEV),
    lambda: fnn.LayerNorm((6, 24), eps=1e-3, device=DEV),
    lambda: fnn.LayerNorm(24, bias=False, device=DEV),
    lambda: fnn.RMSNorm(24, device=DEV),
    lambda: fnn.RMSNorm((6, 24), eps=1e-6, elementwise_affine=False, device=DEV),
], ids=["ln", "ln-2d", "ln-nobias", "rms", "rms-2d-noaffine"])
def test_compile_fullgraph_module_parity(make, backend, fresh_dynamo):
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = _rand(3, 6, 24)

    def run(mod):
        mod.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = mod(xx)
        (y * torch.arange(y.numel(), device=DEV).view(y.shape).sin()).sum().backward()
        return [y.detach()], [xx.grad] + [p.grad for p in m.parameters()]

    eager = run(m)
    compiled = run(torch.compile(m, backend="aot_eager", fullgraph=True))
    _assert_same_run(compiled, eager)


def test_compile_inductor(fresh_dynamo):
    """The default (inductor) backend: fused ops stay opaque, the graph around them is generated."""
    leaves = _leaves(M=5, N=16)
    eager = _run(_fn_chain, leaves)
    compiled = _run(torch.compile(_fn_chain, fullgraph=True), leaves)
    _assert_same_run(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_dynamic_shapes(backend, fresh_dynamo):
    """dynamic=True: one graph serves every batch size and row length, fake functions included."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("aot_eager")
    cf = torch.compile(_fn_chain, backend=cnt, fullgraph=True, dynamic=True)
    frames = []
    for lead, M, N in [((2,), 3, 8), ((3,), 7, 8), ((2,), 5, 13), ((4,), 2, 20)]:
        leaves = _leaves(M=M, N=N, lead=lead)
        _assert_same_run(_run(cf, leaves), _run(_fn_chain, leaves))
        frames.append(cnt.frame_count)
    assert frames == frames[:1] * len(frames), f"recompiled: frames compiled after each call {frames}"
    # dynamo may also hand over an empty graph; exactly one holds the computation
    assert sum(any(n.op == "call_function" for n in gm.graph.nodes) for gm in cnt.graphs) == 1


def test_export_holds_the_custom_op():
    """torch.export: the fused op is captured as itself (its fake function traces the graph), and the
    exported program computes what the module does."""
    m = _randomize(fnn.LayerNorm(16, device=DEV))
    x = _rand(3, 4, 16)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("fusedstab.layer_norm_fwd" in t for t in targets), targets
    x2 = _rand(3, 4, 16)
    torch.testing.assert_close(ep.module()(x2), m(x2))


# =============================================================================== 3. nn drop-ins
_PAIRS = {
    "LayerNorm": (fnn.LayerNorm, torch.nn.LayerNorm),
    "RMSNorm": (fnn.RMSNorm, torch.nn.RMSNorm),
}
# (class name, args, kwargs)
_MODULE_CONFIGS = [
    ("LayerNorm", (16,), {}),
    ("LayerNorm", ((16,),), {}),
    ("LayerNorm", ([4, 16],), {}),
    ("LayerNorm", (torch.Size([4, 16]),), {"eps": 1e-3}),
    ("LayerNorm", (16,), {"elementwise_affine": False}),
    ("LayerNorm", (16,), {"bias": False}),
    ("LayerNorm", ((4, 16),), {"elementwise_affine": False, "bias": False}),
    ("RMSNorm", (16,), {}),
    ("RMSNorm", ([4, 16],), {}),
    ("RMSNorm", (16,), {"eps": 1e-6}),
    ("RMSNorm", ((4, 16),), {"elementwise_affine": False}),
]
_MODULE_IDS = [f"{c}-{a[0] if not isinstance(a[0], torch.Size) else tuple(a[0])}-"
               f"{','.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for c, a, kw in _MODULE_CONFIGS]


def _module_pair(cls_name, args, kwargs, **extra):
    fs_cls, t_cls = _PAIRS[cls_name]
    return fs_cls(*args, **kwargs, **extra), t_cls(*args, **kwargs, **extra)


def _randomize(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


@pytest.mark.parametrize("name", list(_PAIRS))
def test_module_constructor_signature_is_torch(name):
    fs_cls, t_cls = _PAIRS[name]
    assert issubclass(fs_cls, t_cls)
    assert inspect.signature(fs_cls) == inspect.signature(t_cls)
    assert inspect.signature(fs_cls.forward) == inspect.signature(t_cls.forward)


@pytest.mark.parametrize("cfg", _MODULE_CONFIGS, ids=_MODULE_IDS)
def test_module_attributes_params_state_dict_repr(cfg):
    fs, t = _module_pair(*cfg)
    assert repr(fs) == repr(t)
    for attr in ("normalized_shape", "eps", "elementwise_affine"):
        assert getattr(fs, attr) == getattr(t, attr), attr
    assert isinstance(fs.normalized_shape, tuple)
    assert [(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in fs.named_parameters()] == \
           [(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in t.named_parameters()]
    assert list(fs.named_buffers()) == list(t.named_buffers()) == []
    sd_fs, sd_t = fs.state_dict(), t.state_dict()
    assert list(sd_fs) == list(sd_t)
    for k in sd_t:
        torch.testing.assert_close(sd_fs[k], sd_t[k], rtol=0, atol=0)
    for n in ("weight", "bias"):  # absent parameters are registered as None, as torch does
        assert (getattr(fs, n, "missing") is None) == (getattr(t, n, "missing") is None)


@pytest.mark.parametrize("cfg", _MODULE_CONFIGS, ids=_MODULE_IDS)
def test_module_load_state_dict_both_ways(cfg):
    fs, t = _module_pair(*cfg)
    _randomize(t, seed=1)
    fs.load_state_dict(t.state_dict(), strict=True)
    for k, v in t.state_dict().items():
        torch.testing.assert_close(fs.state_dict()[k], v, rtol=0, atol=0)

    fs2, t2 = _module_pair(*cfg)
    _randomize(fs2, seed=2)
    t2.load_state_dict(fs2.state_dict(), strict=True)
    for k, v in fs2.state_dict().items():
        torch.testing.assert_close(t2.state_dict()[k], v, rtol=0, atol=0)

    # A module round-tripped through the other class computes what it computed before.
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(fs(x), t(x))
    torch.testing.assert_close(t2(x), fs2(x))


@pytest.mark.parametrize("cfg", _MODULE_CONFIGS, ids=_MODULE_IDS)
def test_module_forward_backward_match_torch(cfg, backend):
    fs, t = _module_pair(*cfg, device=DEV)
    _randomize(t)
    fs.load_state_dict(t.state_dict())
    x = _rand(2, 3, 4, 16)
    dy = _rand(2, 3, 4, 16)
    xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yt = fs(xf), t(xt)
    assert yf.shape == yt.shape and yf.dtype == yt.dtype
    torch.testing.assert_close(yf, yt)
    yf.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(xf.grad, xt.grad)
    for (n, pf), (_, pt) in zip(fs.named_parameters(), t.named_parameters()):
        torch.testing.assert_close(pf.grad, pt.grad, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("name", list(_PAIRS))
def test_module_train_eval_same(name, backend):
    fs, _ = _module_pair(name, ((4, 16),), {}, device=DEV)
    _randomize(fs)
    x = _rand(3, 4, 16)
    fs.train()
    y_train = fs(x)
    fs.eval()
    y_eval = fs(x)
    fs.train()
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    torch.testing.assert_close(fs(x), y_train, rtol=0, atol=0)
    assert list(fs.buffers()) == []


@pytest.mark.parametrize("name", list(_PAIRS))
def test_module_dtype_kwarg(name, backend):
    fs, t = _module_pair(name, (16,), {}, device=DEV, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in fs.parameters())
    assert [p.dtype for p in fs.parameters()] == [p.dtype for p in t.parameters()]
    _randomize(t)
    fs.load_state_dict(t.state_dict())
    x = _rand(5, 16, dtype=torch.float64, requires_grad=True)
    y = fs(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, t(x), rtol=1e-12, atol=1e-12)
    gf = torch.autograd.grad(y.square().sum(), [x, fs.weight])
    gt = torch.autograd.grad(t(x).square().sum(), [x, t.weight])
    for a, b in zip(gf, gt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(_PAIRS))
def test_module_device_kwarg_meta(name):
    """device= is honoured (meta: no storage), and the fake functions serve meta tensors."""
    fs, t = _module_pair(name, ((4, 16),), {}, device="meta", dtype=torch.float16)
    assert [(p.device, p.dtype) for p in fs.parameters()] == [(p.device, p.dtype) for p in t.parameters()]
    assert all(p.device.type == "meta" for p in fs.parameters())
    x = torch.empty(3, 4, 16, device="meta", dtype=torch.float16)
    y, yt = fs(x), t(x)
    assert (y.device, y.shape, y.dtype) == (yt.device, yt.shape, yt.dtype)
    fs.to_empty(device="cpu")
    fs.reset_parameters()
    assert fs.weight.device.type == "cpu"
    torch.testing.assert_close(fs.weight, torch.ones(4, 16, dtype=torch.float16))


# =============================================================================== drop-in semantics
@pytest.mark.parametrize("kind", ["strided", "expanded", "2d-transposed"])
def test_weight_and_bias_with_any_strides(kind, backend):
    """torch accepts weight and bias of any strides (a slice of a larger parameter, an expanded
    scalar, a transposed matrix); fusedstab must give torch's values and gradients for them."""
    N = 12
    if kind == "strided":
        w = torch.randn(2 * N, device=DEV)[::2]
        b = torch.randn(3 * N, device=DEV)[::3]
        ns, shape = (N,), (5, N)
    elif kind == "expanded":
        w = torch.tensor(1.5, device=DEV).expand(N)
        b = torch.tensor(-0.25, device=DEV).expand(N)
        ns, shape = (N,), (5, N)
    else:
        w = torch.randn(4, 3, device=DEV).t()
        b = torch.randn(4, 3, device=DEV).t()
        ns, shape = (3, 4), (5, 3, 4)
    assert not w.is_contiguous() and not b.is_contiguous()
    x = _rand(*shape)
    torch.testing.assert_close(F.layer_norm(x, ns, w, b), TF.layer_norm(x, ns, w, b))
    torch.testing.assert_close(F.rms_norm(x, ns, w), TF.rms_norm(x, ns, w))
    r = _rand(*shape)
    y, h = F.add_layer_norm(x, r, ns, w, b)
    torch.testing.assert_close(y, TF.layer_norm(x + r, ns, w, b))

    if kind != "expanded":  # gradients for leaves that are non-contiguous views
        wl, bl = w.detach().requires_grad_(), b.detach().requires_grad_()
        xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = _rand(*shape)
        gf = torch.autograd.grad(F.layer_norm(xf, ns, wl, bl), [xf, wl, bl], dy)
        gt = torch.autograd.grad(TF.layer_norm(xt, ns, wl, bl), [xt, wl, bl], dy)
        for a, e in zip(gf, gt):
            torch.testing.assert_close(a, e)


def test_add_layer_norm_matches_torch_composite(backend):
    """add_layer_norm(x, r) == (layer_norm(x + r), x + r), values and gradients, rms or not."""
    x, r, w, b = _leaves(M=5, N=20)
    for rms in (False, True):
        def fs(x, r, w, b):
            return F.add_layer_norm(x, r, (20,), w, None if rms else b, eps=1e-5, rms=rms)

        def ref(x, r, w, b):
            h = x + r
            y = TF.rms_norm(h, (20,), w, 1e-5) if rms else TF.layer_norm(h, (20,), w, b, 1e-5)
            return y, h

        (of, gf), (ot, gt) = _run(fs, [x, r, w, b]), _run(ref, [x, r, w, b])
        _assert_same_run((of, gf[:3]), (ot, gt[:3]))
        assert (gf[3] is None) == rms


@pytest.mark.parametrize("used", ["y", "h"])
@pytest.mark.parametrize("rdtype", [torch.float32, torch.float64], ids=["r32", "r64"])
def test_add_layer_norm_one_output_used(backend, used, rdtype):
    """Gradients when only y or only h feeds the loss (the other output gets no zero gradient
    tensor): as torch's composite, with the residual in its own dtype."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 24, generator=g).requires_grad_()
    r = torch.randn(6, 24, generator=g, dtype=rdtype).requires_grad_()
    w, b = torch.randn(24, generator=g).requires_grad_(), torch.randn(24, generator=g).requires_grad_()
    dout = torch.randn(6, 24, generator=g, dtype=torch.float32 if used == "y" else rdtype)
    y, h = F.add_layer_norm(x, r, (24,), w, b)
    gf = torch.autograd.grad(y if used == "y" else h, [x, r, w, b], dout, allow_unused=True)
    h_ref = x + r
    y_ref = TF.layer_norm(h_ref.float(), (24,), w, b) if used == "y" else None
    gt = torch.autograd.grad(y_ref if used == "y" else h_ref, [x, r, w, b], dout, allow_unused=True)
    for a, e, name in zip(gf, gt, "xrwb"):
        if e is None:  # h alone: no gradient reaches the norm's weight and bias
            assert a is None or not a.any(), name
            continue
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


def test_rms_norm_default_eps_like_torch(backend):
    """eps=None: the machine epsilon of the accumulation dtype, as torch.nn.functional.rms_norm."""
    x = _rand(4, 8) * 1e-4  # small enough that eps matters
    torch.testing.assert_close(F.rms_norm(x, (8,)), TF.rms_norm(x, (8,)))
    torch.testing.assert_close(F.rms_norm(x, (8,), eps=None), TF.rms_norm(x, (8,), eps=None))
    x64 = x.double() * 1e-4
    torch.testing.assert_close(F.rms_norm(x64, (8,)), TF.rms_norm(x64, (8,)))


def test_functional_signatures_match_torch():
    for name in ("layer_norm", "rms_norm"):
        fs_params = list(inspect.signature(getattr(F, name)).parameters.values())
        t_params = list(inspect.signature(getattr(TF, name)).parameters.values())
        assert [(p.name, p.default) for p in fs_params] == [(p.name, p.default) for p in t_params], name


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
], ids=["cpu-bf16", "cuda-fp16"])
@pytest.mark.parametrize("name", list(_PAIRS))
def test_module_under_autocast_like_torch(name, device, dtype):
    """Under autocast the drop-in returns what torch.nn returns (dtype and values): on CUDA torch runs
    layer_norm in fp32 (autocast's fp32 list) and returns fp32 for an fp16 activation."""
    fs, t = _module_pair(name, (16,), {}, device=device)
    _randomize(t)
    fs.load_state_dict(t.state_dict())
    lin = torch.nn.Linear(16, 16, device=device)
    x = torch.randn(8, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        a = lin(x)
        yt, yf = t(a), fs(a)
    assert yf.dtype == yt.dtype, (yf.dtype, yt.dtype)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(yf.float(), yt.float(), **tol)


# =============================================================================== 4. bad input
def _x():
    return torch.randn(3, 4)


# (id, call(fn) for a layer_norm-like fn(input, normalized_shape, weight=None, ...), message regex)
_BAD = [
    ("wrong-normalized_shape", lambda f: f(_x(), (5,)), "normalized_shape"),
    ("wrong-normalized_shape-2d", lambda f: f(_x(), (3, 5)), "normalized_shape"),
    ("normalized_shape-longer-than-input", lambda f: f(torch.randn(3, 4), (2, 3, 4)), "normalized_shape"),
    ("empty-normalized_shape", lambda f: f(_x(), ()), "normalized_shape"),
    ("empty-normalized_shape-list", lambda f: f(_x(), []), "normalized_shape"),
    ("int-normalized_shape", lambda f: f(_x(), 4), "normalized_shape"),
    ("int64-input", lambda f: f(torch.ones(3, 4, dtype=torch.int64), (4,)), "Long"),
    ("int32-input", lambda f: f(torch.ones(3, 4, dtype=torch.int32), (4,)), "Int"),
    ("bool-input", lambda f: f(torch.ones(3, 4, dtype=torch.bool), (4,)), "Bool"),
    # with a float weight torch's CPU layer_norm refuses the mix of dtypes first (RuntimeError)
    ("int64-input-float-weight", lambda f: f(torch.ones(3, 4, dtype=torch.int64), (4,), torch.ones(4)), None),
    ("bool-input-float-weight", lambda f: f(torch.ones(3, 4, dtype=torch.bool), (4,), torch.ones(4)), None),
    ("non-tensor-input", lambda f: f([[1.0, 2.0]], (2,)), "Tensor"),
    ("weight-wrong-shape", lambda f: f(_x(), (4,), torch.ones(5)), "weight"),
    ("weight-wrong-ndim", lambda f: f(_x(), (4,), torch.ones(1, 4)), "weight"),
    ("weight-other-device", lambda f: f(_x(), (4,), torch.ones(4, device="meta")), "device"),
]


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_bad_input_raises_like_torch(case, name):
    _, call, match = case
    assert_raises_like_torch(lambda: call(getattr(TF, name)), lambda: call(getattr(F, name)), match)


@pytest.mark.parametrize("case", [
    ("bias-wrong-shape", lambda f: f(_x(), (4,), torch.ones(4), torch.ones(5)), "bias"),
    ("bias-only-wrong-shape", lambda f: f(_x(), (4,), None, torch.ones(3)), "bias"),
    ("bias-other-device", lambda f: f(_x(), (4,), None, torch.ones(4, device="meta")), "device"),
], ids=lambda c: c[0])
def test_bad_bias_raises_like_torch(case):
    _, call, match = case
    assert_raises_like_torch(lambda: call(TF.layer_norm), lambda: call(F.layer_norm), match)


@pytest.mark.parametrize("name", list(_PAIRS))
def test_module_bad_input_raises_like_torch(name):
    fs, t = _module_pair(name, (4,), {})
    for bad in (torch.randn(3, 5), torch.ones(3, 4, dtype=torch.int64)):
        assert_raises_like_torch(lambda: t(bad), lambda: fs(bad))


def _torch_add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, rms=False):
    """What a user writes without fusedstab: the reference for add_layer_norm's errors."""
    h = x + residual
    if rms:
        return TF.rms_norm(h, normalized_shape, weight, eps), h
    return TF.layer_norm(h, normalized_shape, weight, bias, eps), h


@pytest.mark.parametrize("rms", (False, True), ids=("ln", "rms"))
@pytest.mark.parametrize("case", [
    ("residual-wrong-shape", lambda f, rms: f(_x(), torch.randn(3, 5), (4,), rms=rms), "residual"),
    ("residual-wrong-ndim", lambda f, rms: f(_x(), torch.randn(2, 3, 5), (4,), rms=rms), "residual"),
    ("residual-other-device", lambda f, rms: f(_x(), torch.randn(3, 4, device="meta"), (4,), rms=rms), "device"),
    ("wrong-normalized_shape", lambda f, rms: f(_x(), _x(), (5,), rms=rms), "normalized_shape"),
    ("int-normalized_shape", lambda f, rms: f(_x(), _x(), 4, rms=rms), "normalized_shape"),
    ("int-input", lambda f, rms: f(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64),
                                   (4,), rms=rms), None),
    ("weight-wrong-shape", lambda f, rms: f(_x(), _x(), (4,), torch.ones(5), rms=rms), "weight"),
    ("weight-other-device", lambda f, rms: f(_x(), _x(), (4,), torch.ones(4, device="meta"), rms=rms), "device"),
], ids=lambda c: c[0])
def test_add_layer_norm_bad_input_raises_like_torch(case, rms):
    _, call, match = case
    assert_raises_like_torch(lambda: call(_torch_add_layer_norm, rms),
                                lambda: call(F.add_layer_norm, rms), match)


def test_add_layer_norm_residual_is_not_broadcast():
    """The residual must have x's size exactly (the fused kernel reads it row for row): a residual
    that would broadcast is refused with a clear error, never silently misread."""
    with pytest.raises(RuntimeError, match="residual"):
        F.add_layer_norm(_x(), torch.randn(4), (4,))
    with pytest.raises(RuntimeError, match="residual"):
        F.add_layer_norm(_x(), torch.randn(1, 4), (4,))


def test_add_layer_norm_rms_with_bias_raises():
    """RMSNorm has no bias: torch.nn.functional.rms_norm does not even take one (TypeError for the
    keyword); add_layer_norm(rms=True, bias=...) is a bad argument value: ValueError."""
    with pytest.raises(TypeError):
        TF.rms_norm(_x(), (4,), torch.ones(4), bias=torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        F.add_layer_norm(_x(), _x(), (4,), torch.ones(4), torch.ones(4), rms=True)
    with pytest.raises(ValueError, match="bias"):
        F.add_layer_norm(_x(), _x(), (4,), None, torch.ones(4), eps=None, rms=True)


def test_add_layer_norm_eps_none_needs_rms():
    with pytest.raises(TypeError, match="eps"):
        F.add_layer_norm(_x(), _x(), (4,), eps=None, rms=False)

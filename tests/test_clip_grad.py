"""fusedstab.utils gradient clipping against torch.nn.utils.

Every result is compared with eager torch (``torch.nn.utils``, same call on clones of the same
gradients: dtype, device, shape and NaN/Inf positions must agree) and with a float64 truth (torch in
float64 on float64 copies of the very same values), by the per-dtype rule in ``helpers``: fp32/fp64
tight, fp16/bf16 at most 2x torch's own error. Each test runs on the ``triton`` backend (on CPU
through the Triton interpreter) and the ``torch`` backend; tests parametrized on device also run on
CUDA under the ``gpu`` mark (bf16 there only: the interpreter's bf16 loads are unreliable).

The random parameter sets (``random_specs``) mix 1..40 tensors of 0..5000 elements (primes, powers of
two, non-powers of two), fp32/fp16/fp64 in one list, some grads None, all-zero and half-zero grads,
magnitudes over three decades, and layouts: contiguous, transposed (dense, not contiguous),
channels_last, a storage offset, and strided slices (not dense). Dedicated tests cover the chunk
boundaries of the multi-tensor kernels (tensors larger than one chunk), views into one flat buffer
(as DDP/FSDP buckets hold gradients), NaN/Inf, the error_if_nonfinite error, and the extras beyond
torch: ``max_norm`` as a tensor, ``nonfinite="skip"``, ``return_per_tensor``.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import pytest
import torch
from torch.nn import utils as TU

import fusedstab
from fusedstab import backend as fs_backend
from fusedstab import utils as FU

from helpers import LOWP_FLOOR, LOWP_RATIO, TIGHT, check_like_eager, max_err

INF = float("inf")
# Norm types: float and int forms, torch's string 'inf', and p beyond the usual (negative, non-dyadic).
NORM_TYPES = [2.0, 2, 1.0, 1, INF, "inf", -INF, 0.0, 0, 0.5, 3.0, 3, 1.7, -1.0]
CORE_NORMS = [2.0, 1.0, INF, -INF, 0.0, 0.5, 3.0]
SIZES = [0, 1, 2, 3, 5, 7, 12, 31, 48, 64, 127, 509, 1000, 1020, 1021, 2039, 2048, 4092, 4093, 4096,
         4999, 5000]
CPU_DTYPES = (torch.float32, torch.float16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEEDS = range(5)


def _chunk() -> int:
    """Elements per program of the multi-tensor kernels (tests straddle it); 16384 if not exposed."""
    try:
        from fusedstab.kernels import multi_tensor as K
        return int(getattr(K, "CHUNK", 16384))
    except Exception:
        return 16384


def _nid(p) -> str:
    return f"{type(p).__name__}:{p}"


DEVICE_DTYPES = [pytest.param("cpu", CPU_DTYPES, id="cpu"),
                 pytest.param("cuda", GPU_DTYPES, id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def backend(request):
    """Runs the test body under ``fusedstab.use_backend`` (parametrized by tests/conftest.py)."""
    with fusedstab.use_backend(request.param):
        yield request.param


# ============================================================================ random parameter sets
@dataclass
class GradSpec:
    """One parameter: its shape and dtype, and its gradient's values (None: no grad) and layout."""

    shape: tuple
    dtype: torch.dtype
    values: torch.Tensor | None  # contiguous, in ``dtype``, on ``device``
    layout: str = "contig"
    device: str = "cpu"

    def make_grad(self) -> torch.Tensor | None:
        """A fresh gradient tensor holding ``values`` in this spec's memory layout."""
        v = self.values
        if v is None:
            return None
        if self.layout == "contig":
            return v.clone()
        if self.layout == "t":  # dense, column-major: not contiguous
            return v.t().contiguous().t()
        if self.layout == "cl":
            return v.contiguous(memory_format=torch.channels_last)
        if self.layout == "offset":  # dense, with a storage offset
            buf = torch.empty(v.numel() + 3, dtype=v.dtype, device=v.device)
            return buf[3:].view(v.shape).copy_(v)
        if self.layout == "slice":  # every other element of the last dim: not dense
            buf = torch.full((*v.shape[:-1], 2 * v.shape[-1]), 7.0, dtype=v.dtype, device=v.device)
            g = buf[..., ::2]
            g.copy_(v)
            return g
        raise ValueError(self.layout)

    def make_param(self) -> torch.Tensor:
        p = torch.zeros(self.shape, dtype=self.dtype, device=self.device).requires_grad_()
        p.grad = self.make_grad()
        return p



def _shape_layout(rng: random.Random, n: int) -> tuple[tuple, str]:
    r = rng.random()
    if n % 12 == 0 and n and r < 0.3:
        return (n // 12, 3, 2, 2), rng.choice(["cl", "contig"])
    divs = [d for d in range(2, 9) if n % d == 0 and n // d > 1]
    if divs and r < 0.7:
        d = rng.choice(divs)
        return (d, n // d), rng.choice(["t", "slice", "contig", "offset"])
    return (n,), rng.choice(["contig", "contig", "offset", "slice"])


def random_specs(seed: int, norm_type=2.0, dtypes=CPU_DTYPES, device="cpu", max_tensors: int = 40,
                 p_none: float = 0.15, sizes=SIZES) -> list[GradSpec]:
    """A seeded random parameter set (see the module docstring). Where fp16 would overflow (torch
    rounds each tensor's norm to fp16, and an all-fp16 list's total too) the fp16 values are scaled
    down, so that torch's own result stays a fair reference."""
    rng = random.Random(seed * 7919 + 17)
    gen = torch.Generator().manual_seed(seed)
    p = float(norm_type)
    if p < 0 or p == INF:
        sizes = [s for s in sizes if s]  # torch: no inf or p < 0 norm of an empty tensor (test_empty_tensor_norm)
    specs = []
    for _ in range(rng.randint(1, max_tensors)):
        dtype = rng.choice(dtypes)
        shape, layout = _shape_layout(rng, rng.choice(sizes))
        if rng.random() < p_none:
            specs.append(GradSpec(shape, dtype, None, layout))
            continue
        v = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** rng.uniform(-2, 1)
        r = rng.random()
        if r < 0.08:
            v.zero_()
        elif r < 0.2:
            v[torch.rand(shape, generator=gen) < 0.5] = 0
        specs.append(GradSpec(shape, dtype, v, layout))
    low = [s for s in specs if s.values is not None and s.dtype in (torch.float16, torch.bfloat16)]
    if low and p > 0:
        for s in low:  # each tensor's norm (homogeneous of degree 1 for every p > 0) at most 1e4
            n = torch.linalg.vector_norm(s.values.to(s.dtype).double(), p).item()
            if n > 1e4:
                s.values = s.values * (1e4 / n)
        if len(low) == sum(s.values is not None for s in specs):
            tot = TU.get_total_norm([s.values.to(s.dtype).double() for s in low], p).item()
            if tot > 3e4:
                for s in low:
                    s.values = s.values * (3e4 / tot)
    for s in specs:
        s.device = device
        if s.values is not None:
            s.values = s.values.to(dtype=s.dtype, device=device)
    return specs


def make_params(specs: list[GradSpec]) -> list[torch.Tensor]:
    return [s.make_param() for s in specs]


def truth_params(specs: list[GradSpec]) -> list[torch.Tensor]:
    """float64 copies of the same values (the truth is computed on these)."""
    out = []
    for s in specs:
        p = torch.zeros(s.shape, dtype=torch.float64, device=s.device).requires_grad_()
        p.grad = None if s.values is None else s.values.double().clone()
        out.append(p)
    return out


def grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


# Precision order: a result is only as precise as the least precise tensor that went into it (the
# total of an fp64 + fp32 list is fp64 but carries the fp32 part's rounding, in torch too).
_PREC = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}
ACC_EPS = 4 * torch.finfo(torch.float32).eps  # an fp32 accumulation's own rounding, in relative terms


def list_prec(tensors) -> torch.dtype:
    """The least precise real dtype among ``tensors`` (complex: its real dtype)."""
    dts = [t.real.dtype if t.is_complex() else t.dtype for t in tensors if t is not None]
    return min(dts, key=_PREC.__getitem__) if dts else torch.float64


def assert_matches(got, truth64, eager, what="", prec: torch.dtype | None = None):
    """``got`` (fusedstab) vs the float64 ``truth64`` and eager torch's ``eager`` (whose dtype, shape
    and device ``got`` must have). ``prec``: the least precise dtype that went into the result
    (default: got's own). fp32/fp64 precision: rtol/atol of ``TIGHT`` (atol relative to
    max(1, max|truth|)); fp16/bf16 precision: max error at most LOWP_RATIO x torch's own + a floor
    (LOWP_FLOOR, and an fp32 accumulation's rounding of max|truth|)."""
    if not check_like_eager(got, truth64, eager, what):
        return
    prec = min(got.dtype, prec or got.dtype, key=_PREC.__getitem__) if got.dtype in _PREC else got.dtype
    scale = max(1.0, truth64.abs().max().item())
    if prec in LOWP_FLOOR:
        err, err_torch = max_err(got, truth64), max_err(eager, truth64)
        bound = LOWP_RATIO * err_torch + LOWP_FLOOR[prec] + ACC_EPS * scale
        assert err <= bound, (f"{what} ({got.dtype}, precision {prec}): max error vs float64 {err:.3e} > "
                              f"{LOWP_RATIO}x torch's {err_torch:.3e} + floor")
    else:
        rtol, atol = TIGHT[prec]
        torch.testing.assert_close(got.double(), truth64.to(got.device), rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{what} ({got.dtype}, precision {prec}) vs float64 truth: {m}")


def assert_grads_match(got_params, truth_params_, torch_params, what=""):
    """Clipped grads: each as precise as its dtype and the clip coefficient (the list's precision)."""
    prec = list_prec([p.grad for p in torch_params])
    for i, (g, t, e) in enumerate(zip(got_params, truth_params_, torch_params)):
        assert (g.grad is None) == (e.grad is None), f"{what}[{i}]: grad None-ness changed"
        if g.grad is not None:
            assert_matches(g.grad, t.grad, e.grad, f"{what} grad[{i}] {tuple(g.shape)}", prec)


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor, what=""):
    """Same dtype, device, shape, and bitwise the same values (NaN where NaN)."""
    assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, \
        f"{what}: {a.dtype}/{a.device}/{tuple(a.shape)} vs {b.dtype}/{b.device}/{tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _max_norm_for(total64: float, rng: random.Random) -> float:
    """A threshold that clips (most cases) or leaves the grads unscaled."""
    if not math.isfinite(total64) or total64 == 0:
        return 1.0
    return total64 * rng.choice([0.25, 0.7, 4.0])


# ============================================================================ 1. random sets vs torch
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=_nid)
@pytest.mark.parametrize("device,dtypes", DEVICE_DTYPES)
def test_clip_grad_norm_random_sets(backend, device, dtypes, norm_type, seed):
    _check_clip_against_torch(random_specs(seed, norm_type, dtypes, device), norm_type, seed)


SINGLE_DTYPE = ([pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in CPU_DTYPES]
                + [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.gpu) for dt in GPU_DTYPES])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 0.5, 1.7], ids=_nid)
@pytest.mark.parametrize("device,dtype", SINGLE_DTYPE)
def test_clip_grad_norm_single_dtype_sets(backend, device, dtype, norm_type):
    """Lists of one dtype: nothing less precise in the list, so fp64 is held to fp64 precision."""
    _check_clip_against_torch(random_specs(11, norm_type, (dtype,), device), norm_type, 11)


def _check_clip_against_torch(specs, norm_type, seed):
    ref64 = truth_params(specs)
    total64 = TU.get_total_norm(grads(ref64), norm_type)
    max_norm = _max_norm_for(total64.item(), random.Random(seed))
    TU.clip_grad_norm_(ref64, max_norm, norm_type)

    eager = make_params(specs)
    total_t = TU.clip_grad_norm_(eager, max_norm, norm_type)
    got = make_params(specs)
    total = FU.clip_grad_norm_(got, max_norm, norm_type)

    assert_matches(total, total64, total_t, f"total norm (p={norm_type!r})", list_prec(grads(eager)))
    assert_grads_match(got, ref64, eager, f"p={norm_type!r}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_type", CORE_NORMS + [1.7, -1.0], ids=_nid)
@pytest.mark.parametrize("device,dtypes", DEVICE_DTYPES)
def test_get_total_norm_and_per_tensor(backend, device, dtypes, norm_type, seed):
    """get_total_norm on a list of tensors; with return_per_tensor, every tensor's own norm from the
    same pass (vs torch.linalg.vector_norm per tensor), in the accumulation dtype (fp64 when the list
    holds fp64, else fp32) on the first tensor's device."""
    specs = [s for s in random_specs(seed + 100, norm_type, dtypes, device) if s.values is not None]
    if not specs:
        specs = random_specs(0, norm_type, dtypes, device, p_none=0.0)
    tensors = [s.make_grad() for s in specs]
    t64 = [t.double() for t in tensors]
    truth = TU.get_total_norm(t64, norm_type)
    eager = TU.get_total_norm(tensors, norm_type)

    total = FU.get_total_norm(tensors, norm_type)
    assert_matches(total, truth, eager, "total", list_prec(tensors))
    total2, per = FU.get_total_norm(tensors, norm_type, return_per_tensor=True)
    assert_same_tensor(total2, total, "total with return_per_tensor")

    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    assert per.shape == (len(tensors),) and per.dtype == acc and per.device == tensors[0].device, \
        f"per-tensor norms: {tuple(per.shape)} {per.dtype} {per.device}"
    for i, t in enumerate(tensors):
        want = torch.linalg.vector_norm(t64[i], float(norm_type))
        if not torch.isfinite(want):  # p < 0 over an empty tensor: inf, as torch
            assert_same_tensor(per[i].double(), want, f"per-tensor[{i}]")
            continue
        rtol, atol = TIGHT[torch.float64 if t.dtype == torch.float64 else torch.float32]
        torch.testing.assert_close(per[i].double(), want, rtol=rtol, atol=atol * max(1.0, want.item()),
                                   msg=lambda m: f"per-tensor norm [{i}] {t.dtype} n={t.numel()}: {m}")


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("norm_type", [2.0, INF, 0.5], ids=_nid)
@pytest.mark.parametrize("device,dtypes", DEVICE_DTYPES)
def test_clip_grads_with_norm_random_sets(backend, device, dtypes, norm_type, seed):
    """The two halves separately: fusedstab's total through fusedstab's clip_grads_with_norm_, and
    torch's own total through it (the scaling alone)."""
    specs = random_specs(seed + 200, norm_type, dtypes, device)
    ref64 = truth_params(specs)
    total64 = TU.get_total_norm(grads(ref64), norm_type)
    max_norm = _max_norm_for(total64.item(), random.Random(seed))
    TU.clip_grads_with_norm_(ref64, max_norm, total64)

    eager = make_params(specs)
    total_t = TU.get_total_norm(grads(eager), norm_type)
    TU.clip_grads_with_norm_(eager, max_norm, total_t)

    got = make_params(specs)
    total = FU.get_total_norm(grads(got), norm_type)
    assert FU.clip_grads_with_norm_(got, max_norm, total) is None
    assert_matches(total, total64, total_t, "total", list_prec(grads(eager)))
    assert_grads_match(got, ref64, eager, "fusedstab total")

    got2 = make_params(specs)
    FU.clip_grads_with_norm_(got2, max_norm, total_t.clone())
    assert_grads_match(got2, ref64, eager, "torch's total")


# ============================================================================ 2. input forms
def _simple_params(n=5, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 17, 1, 64, 129, 7, 2, 33][:n]
    ps = []
    for s in sizes:
        p = torch.zeros(s, dtype=dtype, device=device).requires_grad_()
        p.grad = torch.randn(s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        ps.append(p)
    return ps


def _clone(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("form", ["list", "tuple", "generator", "single"])
def test_input_forms(backend, form):
    params = _simple_params()
    if form == "single":
        params = params[3:4]
    wrap = {"list": list, "tuple": tuple, "generator": lambda ps: (p for p in ps),
            "single": lambda ps: ps[0]}[form]
    eager, got = _clone(params), _clone(params)
    total_t = TU.clip_grad_norm_(wrap(eager), 0.5)
    total = FU.clip_grad_norm_(wrap(got), 0.5)
    assert_same_tensor_close(total, total_t, "clip_grad_norm_ total")
    for g, e in zip(got, eager):
        torch.testing.assert_close(g.grad, e.grad)
    for p, orig in zip(got, params):  # every grad clipped: the generator was consumed once, fully
        assert not torch.equal(p.grad, orig.grad)

    assert_same_tensor_close(FU.get_total_norm(wrap(grads(params))), TU.get_total_norm(wrap(grads(params))),
                             "get_total_norm")
    got2, eager2 = _clone(params), _clone(params)
    TU.clip_grads_with_norm_(wrap(eager2), 0.5, total_t)
    FU.clip_grads_with_norm_(wrap(got2), 0.5, total_t)
    for g, e in zip(got2, eager2):
        torch.testing.assert_close(g.grad, e.grad)
    got3, eager3 = _clone(params), _clone(params)
    TU.clip_grad_value_(wrap(eager3), 0.3)
    assert FU.clip_grad_value_(wrap(got3), 0.3) is None
    for g, e in zip(got3, eager3):
        assert torch.equal(g.grad, e.grad)


def assert_same_tensor_close(a, b, what=""):
    assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, \
        f"{what}: {a.dtype}/{a.device}/{tuple(a.shape)} vs torch's {b.dtype}/{b.device}/{tuple(b.shape)}"
    torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{what}: {m}")


def test_empty_inputs(backend):
    for fn_t, fn_f in [(TU.get_total_norm, FU.get_total_norm)]:
        for p in (2.0, INF, 0.0):
            assert_same_tensor(fn_f([], p), fn_t([], p), f"get_total_norm([], {p})")
    assert_same_tensor(FU.clip_grad_norm_([], 1.0), TU.clip_grad_norm_([], 1.0), "clip_grad_norm_([])")
    total, per = FU.get_total_norm([], return_per_tensor=True)
    assert_same_tensor(total, torch.tensor(0.0), "empty total")
    assert per.shape == (0,) and per.dtype == torch.float32
    # every grad None: nothing to clip, total 0 as torch
    ps = [torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    assert_same_tensor(FU.clip_grad_norm_(ps, 1.0), TU.clip_grad_norm_(ps, 1.0), "all grads None")
    assert all(p.grad is None for p in ps)
    FU.clip_grads_with_norm_(ps, 1.0, torch.tensor(3.0))
    assert all(p.grad is None for p in ps)
    # (torch's own clip_grad_value_ raises on a list without grads; not asked of fusedstab either way)


def test_empty_generator_warns_like_torch(backend):
    with pytest.warns(UserWarning, match="empty generator") as rec_t:
        TU.clip_grad_norm_((p for p in []), 1.0)
    assert rec_t  # torch warns; fusedstab must too
    with pytest.warns(UserWarning, match="empty generator"):
        total = FU.clip_grad_norm_((p for p in []), 1.0)
    assert_same_tensor(total, torch.tensor(0.0))


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_accepted(backend, foreach):
    params = _simple_params(8, dtype=torch.float32) + _simple_params(3, dtype=torch.float64, seed=1)
    base = _clone(params)
    total0 = FU.clip_grad_norm_(base, 0.5)
    got = _clone(params)
    total = FU.clip_grad_norm_(got, 0.5, foreach=foreach)
    eager = _clone(params)
    total_t = TU.clip_grad_norm_(eager, 0.5, foreach=foreach)
    assert_same_tensor(total, total0, f"foreach={foreach}")
    torch.testing.assert_close(total, total_t)
    for a, b, e in zip(got, base, eager):
        assert_same_tensor(a.grad, b.grad, f"foreach={foreach}")
        torch.testing.assert_close(a.grad, e.grad)
    assert_same_tensor(FU.get_total_norm(grads(params), foreach=foreach), FU.get_total_norm(grads(params)))
    FU.clip_grads_with_norm_(_clone(params), 1.0, total, foreach=foreach)
    FU.clip_grad_value_(_clone(params), 1.0, foreach=foreach)


def test_nn_module_parameters(backend):
    """The everyday call: clip_grad_norm_(model.parameters(), ...) after backward (a generator,
    bias-free layers, a parameter that gets no grad)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.LayerNorm(31), torch.nn.GELU(),
                                torch.nn.Linear(31, 5, bias=False))
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(4)))
    model(torch.randn(9, 13)).square().sum().backward()
    twin = copy.deepcopy(model)  # (deepcopy does not copy .grad)
    for a, b in zip(model.parameters(), twin.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()
    total_t = TU.clip_grad_norm_(twin.parameters(), 0.1)
    total = FU.clip_grad_norm_(model.parameters(), 0.1)
    assert_same_tensor_close(total, total_t)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{n}: {m}")
    assert model.unused.grad is None


@pytest.mark.parametrize("norm_type", [2.0, INF, "inf", 1, 0.5], ids=_nid)
def test_norm_type_forms_agree(backend, norm_type):
    """int, float and str forms of one norm type give bitwise the same result."""
    ts = grads(_simple_params(8))
    a = FU.get_total_norm(ts, norm_type)
    b = FU.get_total_norm(ts, float(norm_type))
    assert_same_tensor(a, b)
    assert_same_tensor_close(a, TU.get_total_norm(ts, norm_type))


# ============================================================================ 3. layouts, chunks, in place
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_chunk_boundaries(backend, dtype):
    """Tensors of one chunk -1/0/+1 element, several chunks, and tiny ones in between: the chunk
    table's starts and lengths, the per-tensor reduction of several partials, and the scaling of
    every chunk."""
    c = _chunk()
    sizes = [c - 1, 1, c, 0, c + 1, 3, 3 * c + 7]
    g = torch.Generator().manual_seed(1)
    specs = []
    for n in sizes:
        v = torch.randn(n, generator=g, dtype=torch.float64) * (0.02 if dtype == torch.float16 else 1.0)
        if n > 3:
            v[-1] = 40.0 * (0.02 if dtype == torch.float16 else 1.0)  # the last element of the last chunk counts
        specs.append(GradSpec((n,), dtype, v.to(dtype)))
    # an all-fp16 list's total is fp16 in torch: p < 1 norms of so many elements would overflow it
    for p in ((2.0, 1.0, INF, 3.0) if dtype == torch.float16 else (2.0, 1.0, INF, 0.5)):
        if abs(p) == INF:
            cur = [s for s in specs if s.values.numel()]
        else:
            cur = specs
        ref64 = truth_params(cur)
        total64 = TU.clip_grad_norm_(ref64, 1.0, p)
        eager = make_params(cur)
        total_t = TU.clip_grad_norm_(eager, 1.0, p)
        got = make_params(cur)
        total = FU.clip_grad_norm_(got, 1.0, p)
        assert_matches(total, total64, total_t, f"total p={p}")
        assert_grads_match(got, ref64, eager, f"p={p}")
        _, per = FU.get_total_norm([s.values for s in cur], p, return_per_tensor=True)
        want = torch.stack([torch.linalg.vector_norm(s.values.double(), p) for s in cur])
        torch.testing.assert_close(per.double(), want, rtol=1e-5, atol=1e-6 * want.max().item())


@pytest.mark.parametrize("layout", ["t", "cl", "offset", "slice", "permuted3d"])
def test_layouts_in_place(backend, layout):
    """Strided, channels_last and offset grads are clipped in place: same storage, same strides,
    and the values torch gets."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, 5, 3, generator=g, dtype=torch.float64)
    if layout == "permuted3d":
        v = base.reshape(24, 5, 3)
        spec_vals = [v]
    elif layout == "cl":
        spec_vals = [base]
    else:
        spec_vals = [base.reshape(24, 15), base.reshape(8, 45)[:, :44]]
    params, eager = [], []
    for v in spec_vals:
        for dt in (torch.float32, torch.float16):
            vv = v.to(dt) * (0.05 if dt == torch.float16 else 1)
            if layout == "permuted3d":
                make = lambda vv=vv: vv.permute(2, 0, 1).contiguous().permute(1, 2, 0)
            else:
                make = lambda vv=vv: GradSpec(vv.shape, vv.dtype, vv, layout).make_grad()
            for lst in (params, eager):
                p = torch.zeros(vv.shape, dtype=dt).requires_grad_()
                p.grad = make()
                lst.append(p)
    before = [(p.grad.data_ptr(), p.grad.stride(), p.grad) for p in params]
    total_t = TU.clip_grad_norm_(eager, 0.1)
    total = FU.clip_grad_norm_(params, 0.1)
    torch.testing.assert_close(total, total_t, rtol=2e-3, atol=0)
    for (ptr, stride, obj), p, e in zip(before, params, eager):
        assert p.grad is obj and p.grad.data_ptr() == ptr and p.grad.stride() == stride
        tol = dict(rtol=2e-3, atol=1e-4) if p.dtype == torch.float16 else {}
        torch.testing.assert_close(p.grad, e.grad, **tol)


def test_views_into_flat_buffer(backend):
    """Grads that are views into one flat buffer (DDP buckets, FSDP flat params): the buffer itself
    is scaled, the gaps between views are untouched."""
    sizes = [(3, 5), (7,), (2, 2, 2), (1,), (11, 3)]
    gap = 2
    total_len = sum(math.prod(s) + gap for s in sizes)
    flat = torch.full((total_len,), 123.0)
    params, off, gaps = [], 0, []
    g = torch.Generator().manual_seed(3)
    for s in sizes:
        n = math.prod(s)
        view = flat[off: off + n].view(s)
        view.copy_(torch.randn(s, generator=g))
        p = torch.zeros(s).requires_grad_()
        p.grad = view
        params.append(p)
        gaps.append(slice(off + n, off + n + gap))
        off += n + gap
    eager = _clone(params)
    total_t = TU.clip_grad_norm_(eager, 0.5)
    total = FU.clip_grad_norm_(params, 0.5)
    torch.testing.assert_close(total, total_t)
    for p, e in zip(params, eager):
        torch.testing.assert_close(p.grad, e.grad)
        assert p.grad._base is flat or p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    for sl in gaps:
        assert torch.equal(flat[sl], torch.full((gap,), 123.0)), "bytes between the views were written"
    # the buffer itself holds the clipped values
    torch.testing.assert_close(flat[: 15].view(3, 5), eager[0].grad)


def test_repeated_calls_and_changing_lists(backend):
    """Repeated calls (tables cached per list) on the same, a permuted, a shorter list, and new
    tensors of the same sizes: every call sees its own tensors."""
    params = _simple_params(8)
    for trial in range(4):
        cur = {0: params, 1: params[::-1], 2: params[2:5], 3: _simple_params(8, seed=9)}[trial]
        for p in cur:
            p.grad.copy_(torch.randn(p.shape) * (trial + 1))
        eager = _clone(cur)
        total_t = TU.clip_grad_norm_(eager, 0.3)
        total = FU.clip_grad_norm_(cur, 0.3)
        torch.testing.assert_close(total, total_t, msg=lambda m: f"trial {trial}: {m}")
        for p, e in zip(cur, eager):
            torch.testing.assert_close(p.grad, e.grad, msg=lambda m: f"trial {trial}: {m}")
    # deterministic: the same inputs give bitwise the same total
    ts = grads(_simple_params(8, seed=4))
    assert_same_tensor(FU.get_total_norm(ts), FU.get_total_norm(ts), "repeat")


def test_complex_grads(backend):
    """Complex grads: the norm of |z|, a real total norm (as torch), complex grads scaled."""
    g = torch.Generator().manual_seed(5)
    params = []
    for n, dt in [(7, torch.complex64), (5, torch.float32), (3, torch.complex128)]:
        p = torch.zeros(n, dtype=dt).requires_grad_()
        p.grad = torch.randn(n, generator=g, dtype=dt)
        params.append(p)
    for p_ in (2.0, 1.0, INF):
        eager, got = _clone(params), _clone(params)
        total_t = TU.clip_grad_norm_(eager, 0.5, p_)
        total = FU.clip_grad_norm_(got, 0.5, p_)
        assert_same_tensor_close(total, total_t, f"p={p_}")
        for a, b in zip(got, eager):
            torch.testing.assert_close(a.grad, b.grad)


# ============================================================================ 4. NaN / Inf, errors, skip
SPECIALS = {"nan": float("nan"), "+inf": INF, "-inf": -INF}


def _special_params(kind: str, where: int, device="cpu", fp16=True):
    """A small mixed list with one NaN/+Inf/-Inf in tensor ``where`` (tensor 2 spans chunks: the
    special value sits in its second chunk)."""
    c = _chunk()
    g = torch.Generator().manual_seed(6)
    layout = [(37, torch.float32), (5, torch.float16 if fp16 else torch.float32), (c + 100, torch.float32),
              (9, torch.float64)]
    params = []
    for i, (n, dt) in enumerate(layout):
        v = torch.randn(n, generator=g, dtype=torch.float64) * (0.1 if dt == torch.float16 else 1.0)
        if i == where:
            v[n - 2 if i != 2 else c + 50] = SPECIALS[kind]
        p = torch.zeros(n, dtype=dt, device=device).requires_grad_()
        p.grad = v.to(dt).to(device)
        params.append(p)
    return params


def _assert_nonfinite_like(got, eager, truth64, what):
    """NaN/+Inf/-Inf where torch has them (and the float64 truth too); finite values close to truth."""
    assert got.dtype == eager.dtype and got.device == eager.device and got.shape == eager.shape, what
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(f(got), f(eager)), f"{what}: {name} positions differ from torch's"
    fin = torch.isfinite(eager)
    tol = {torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}.get(got.dtype, (1e-5, 1e-6))
    torch.testing.assert_close(got[fin].double(), truth64.to(got.device)[fin], rtol=tol[0], atol=tol[1],
                               msg=lambda m: f"{what} finite values: {m}")


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("kind", list(SPECIALS))
@pytest.mark.parametrize("norm_type", CORE_NORMS + [-1.0], ids=_nid)
def test_nonfinite_like_torch(backend, norm_type, kind, where):
    """error_if_nonfinite=False: the NaN/Inf total and the NaN/Inf-scaled grads that torch gives."""
    params = _special_params(kind, where)
    ref64 = [torch.zeros(p.shape, dtype=torch.float64).requires_grad_() for p in params]
    for r, p in zip(ref64, params):
        r.grad = p.grad.double().clone()
    total64 = TU.clip_grad_norm_(ref64, 1.0, norm_type)
    eager, got = _clone(params), _clone(params)
    total_t = TU.clip_grad_norm_(eager, 1.0, norm_type)
    total = FU.clip_grad_norm_(got, 1.0, norm_type)
    _assert_nonfinite_like(total, total_t, total64, f"total p={norm_type}")
    for i, (a, e, r) in enumerate(zip(got, eager, ref64)):
        _assert_nonfinite_like(a.grad, e.grad, r.grad, f"grad[{i}] p={norm_type}")
    # per-tensor norms propagate too
    _, per = FU.get_total_norm(grads(params), norm_type, return_per_tensor=True)
    want = torch.stack([torch.linalg.vector_norm(p.grad.double(), float(norm_type)) for p in params])
    for name, f in (("NaN", torch.isnan), ("Inf", torch.isinf)):
        assert torch.equal(f(per), f(want)), f"per-tensor {name}: {per} vs {want}"


@pytest.mark.parametrize("kind", list(SPECIALS))
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 0.5], ids=_nid)
def test_error_if_nonfinite(backend, norm_type, kind):
    params = _special_params(kind, 2)
    eager, got = _clone(params), _clone(params)
    with pytest.raises(RuntimeError) as exc_t:
        TU.clip_grad_norm_(eager, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as exc:
        FU.clip_grad_norm_(got, 1.0, norm_type, error_if_nonfinite=True)
    msg = str(exc.value)
    assert "non-finite" in msg and "error_if_nonfinite" in msg, msg
    assert f"order {float(norm_type)}" in msg or str(norm_type) in msg, msg
    assert type(exc.value) is type(exc_t.value)
    for a, p in zip(got, params):  # raised before anything was scaled
        assert_same_tensor(a.grad, p.grad, "grads after the error")
    with pytest.raises(RuntimeError, match="non-finite"):
        FU.get_total_norm(grads(params), norm_type, error_if_nonfinite=True)
    # finite: no error, the same result as without the check
    ok = _simple_params(6)
    a, b = _clone(ok), _clone(ok)
    ta = FU.clip_grad_norm_(a, 0.5, norm_type, error_if_nonfinite=True)
    tb = FU.clip_grad_norm_(b, 0.5, norm_type)
    assert_same_tensor(ta, tb)
    for x, y in zip(a, b):
        assert_same_tensor(x.grad, y.grad)


def test_error_if_nonfinite_inf_total_of_finite_grads(backend):
    """A total that overflows its dtype (fp16 grads, all finite) is non-finite too, as in torch."""
    p = torch.zeros(300, dtype=torch.float16).requires_grad_()
    p.grad = torch.full((300,), 6e4, dtype=torch.float16)
    with pytest.raises(RuntimeError):
        TU.clip_grad_norm_([_clone([p])[0]], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        FU.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("kind", list(SPECIALS))
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 0.5, -INF, 0.0], ids=_nid)
def test_nonfinite_skip(backend, norm_type, kind, where):
    """nonfinite="skip": a non-finite total leaves every grad exactly zero (NaN/Inf entries too, so
    that an SGD-like step is a no-op) and is still returned (no sync); a finite total clips exactly
    as nonfinite="scale"."""
    params = _special_params(kind, where)
    total_t = TU.get_total_norm(grads(params), norm_type)
    got, scaled = _clone(params), _clone(params)
    total = FU.clip_grad_norm_(got, 1.0, norm_type, nonfinite="skip")
    total_scale = FU.clip_grad_norm_(scaled, 1.0, norm_type, nonfinite="scale")
    assert_same_tensor(total, total_scale, "total")
    assert torch.isfinite(total) == torch.isfinite(total_t)
    if torch.isfinite(total_t):
        for a, b in zip(got, scaled):
            assert_same_tensor(a.grad, b.grad, "finite total: skip == scale")
    else:
        assert torch.isnan(total) == torch.isnan(total_t)
        for i, a in enumerate(got):
            assert torch.equal(a.grad, torch.zeros_like(a.grad)), \
                f"grad[{i}] not zeroed: {a.grad[~(a.grad == 0)][:5]}"


def test_nonfinite_skip_finite_random(backend):
    specs = random_specs(3, 2.0)
    a, b = make_params(specs), make_params(specs)
    assert_same_tensor(FU.clip_grad_norm_(a, 0.1, nonfinite="skip"), FU.clip_grad_norm_(b, 0.1))
    for x, y in zip(a, b):
        if x.grad is not None:
            assert_same_tensor(x.grad, y.grad)
    with pytest.raises(ValueError):
        FU.clip_grad_norm_(make_params(specs), 0.1, nonfinite="bogus")


def test_bad_inputs_raise_like_torch(backend):
    ok = grads(_simple_params(3))
    cases = {
        "norm_type 'fro'": (lambda U: U.get_total_norm(ok, "fro")),
        "integer grads": (lambda U: U.get_total_norm([torch.ones(4, dtype=torch.int64)])),
        "integer grads clip": (lambda U: U.clip_grad_norm_([_int_param()], 1.0)),
        "max_norm 'x'": (lambda U: U.clip_grad_norm_(_clone(_simple_params(2)), "x")),
    }
    for name, call in cases.items():
        with pytest.raises(Exception) as exc_t:
            call(TU)
        with pytest.raises(type(exc_t.value)):
            call(FU)


def _int_param():
    q = torch.zeros(4, dtype=torch.int64)
    q.grad = torch.ones(4, dtype=torch.int64)
    return q


def test_empty_tensor_norm(backend):
    """torch cannot take the inf, -inf or p < 0 norm of an empty tensor (no identity) and raises;
    so must fusedstab (single process: no shards)."""
    ts = [torch.ones(3), torch.empty(0), torch.full((2,), 0.5)]
    for p in (INF, -INF, -1.0):
        with pytest.raises(RuntimeError):
            TU.get_total_norm(ts, p)
        with pytest.raises(RuntimeError, match="empty"):
            FU.get_total_norm(ts, p)
    for p in (2.0, 1.0, 0.0, 0.5):  # other norms: an empty tensor adds nothing
        assert_same_tensor_close(FU.get_total_norm(ts, p), TU.get_total_norm(ts, p), f"p={p}")


# ============================================================================ 5. max_norm as a tensor
@pytest.mark.parametrize("mn", [0.05, 1e6])
def test_max_norm_tensor(backend, mn):
    specs = random_specs(5, 2.0, max_tensors=12)
    ref64 = truth_params(specs)
    total64 = TU.clip_grad_norm_(ref64, mn)
    eager = make_params(specs)
    total_t = TU.clip_grad_norm_(eager, mn)
    got = make_params(specs)
    max_norm = torch.tensor(mn)
    before = max_norm.clone()
    total = FU.clip_grad_norm_(got, max_norm)
    assert torch.equal(max_norm, before)  # not modified
    assert_matches(total, total64, total_t, "total", list_prec(grads(eager)))
    assert_grads_match(got, ref64, eager, "tensor max_norm")
    got2 = make_params(specs)
    FU.clip_grads_with_norm_(got2, torch.tensor(mn, dtype=torch.float64), total)
    assert_grads_match(got2, ref64, eager, "clip_grads_with_norm_ tensor max_norm")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_tensor_max_norm_no_recompile(backend, fresh_dynamo):
    """clip_grad_norm_ traces into one graph (fullgraph) and a new max_norm tensor value reuses it."""
    from torch._dynamo.testing import CompileCounter

    cnt = CompileCounter()

    @torch.compile(backend=cnt, fullgraph=True)
    def step(params, max_norm):
        return FU.clip_grad_norm_(params, max_norm)

    params = _simple_params(6) + _simple_params(2, dtype=torch.float64, seed=2)
    for mn in (0.2, 0.7, 5.0):
        got, eager = _clone(params), _clone(params)
        total = step(got, torch.tensor(mn))
        total_t = TU.clip_grad_norm_(eager, mn)
        torch.testing.assert_close(total, total_t)
        for a, e in zip(got, eager):
            torch.testing.assert_close(a.grad, e.grad, msg=lambda m: f"max_norm={mn}: {m}")
    assert cnt.frame_count == 1, f"compiled {cnt.frame_count} times"


# ============================================================================ 6. clip_grad_value_
@pytest.mark.parametrize("seed", range(3))
def test_clip_grad_value_random(backend, seed):
    specs = random_specs(seed + 300)
    for cv in (0.05, 1.0, torch.tensor(0.5)):
        eager, got = make_params(specs), make_params(specs)
        TU.clip_grad_value_(eager, cv)
        assert FU.clip_grad_value_(got, cv) is None
        for a, e in zip(got, eager):
            if e.grad is not None:
                assert_same_tensor(a.grad, e.grad, f"clip_value={cv}")
    params = _special_params("nan", 1) + _special_params("+inf", 2)
    eager, got = _clone(params), _clone(params)
    TU.clip_grad_value_(eager, 0.2)
    FU.clip_grad_value_(got, 0.2)
    for a, e in zip(got, eager):
        assert_same_tensor(a.grad, e.grad, "NaN/Inf")


# ============================================================================ 7. structure (opcheck: test_multi_tensor_ops.py)
def test_one_norm_and_one_scale_per_group(monkeypatch):
    """Triton backend: one multi-tensor norm call and one scale call per (device, dtype) group, each
    given every dense tensor of its group."""
    if not fs_backend.triton_interpret() and not torch.cuda.is_available():
        pytest.skip("needs the triton backend")
    from fusedstab.kernels import multi_tensor as K

    calls = {"norm": [], "scale": []}
    real_norm, real_scale = K.norm, K.scale_
    monkeypatch.setattr(K, "norm", lambda ts, *a, **k: (calls["norm"].append(len(ts)), real_norm(ts, *a, **k))[1])
    monkeypatch.setattr(K, "scale_", lambda ts, *a, **k: (calls["scale"].append(len(ts)), real_scale(ts, *a, **k))[1])
    device = "cuda" if not fs_backend.triton_interpret() else "cpu"
    params = (_simple_params(8, device) + _simple_params(5, device, torch.float16, 1)
              + _simple_params(3, device, torch.float64, 2) + _simple_params(4, device, seed=3))
    eager = _clone(params)
    with fusedstab.use_backend("triton"):
        total = FU.clip_grad_norm_(params, 0.1)
    total_t = TU.clip_grad_norm_(eager, 0.1)
    torch.testing.assert_close(total, total_t, rtol=1e-3, atol=0)  # torch rounds fp16 norms to fp16
    assert sorted(calls["norm"]) == [3, 5, 12], calls
    assert sorted(calls["scale"]) == [3, 5, 12], calls


# ============================================================================ 8. GPU: no sync, graphs, bf16
def _cuda_params(n=30, seed=0, dtypes=(torch.float32, torch.bfloat16), sizes=(1, 7, 4096, 40000, 3, 65537)):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i in range(n):
        dt, s = dtypes[i % len(dtypes)], sizes[i % len(sizes)]
        p = torch.zeros(s, dtype=dt, device="cuda").requires_grad_()
        p.grad = torch.randn(s, generator=g).to(dtype=dt, device="cuda")
        ps.append(p)
    return ps


@pytest.mark.gpu
@pytest.mark.parametrize("norm_type", [2.0, INF, 1.0], ids=_nid)
def test_cuda_no_host_sync(backend, norm_type):
    params = _cuda_params()
    max_norm = torch.tensor(0.5, device="cuda")
    FU.clip_grad_norm_(params, max_norm, norm_type)  # warm-up: kernels compiled, chunk tables built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = FU.clip_grad_norm_(params, max_norm, norm_type)
        FU.clip_grad_norm_(params, max_norm, norm_type, nonfinite="skip")
        FU.get_total_norm(grads(params), norm_type, return_per_tensor=True)
        FU.clip_grads_with_norm_(params, 1.0, total)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_no_host_sync_first_call(backend):
    """Even the first call on a new list (chunk table built and copied to the device) doesn't sync."""
    params = _cuda_params(seed=1)
    FU.clip_grad_norm_(_cuda_params(seed=2), 0.5)  # kernels compiled (not the tables of ``params``)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        FU.clip_grad_norm_(params, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("norm_type", [2.0, INF], ids=_nid)
def test_cuda_graph_capture_replay(backend, norm_type):
    """Warm up once, capture clip_grad_norm_ with a tensor max_norm, then replay with fresh grads and
    new thresholds: bitwise the eager result each time."""
    params = _cuda_params()
    saved = [p.grad.clone() for p in params]
    max_norm = torch.tensor(1.0, device="cuda")

    def restore():
        for p, s in zip(params, saved):
            p.grad.copy_(s)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        FU.clip_grad_norm_(params, max_norm, norm_type)
    torch.cuda.current_stream().wait_stream(s)
    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = FU.clip_grad_norm_(params, max_norm, norm_type)
    for mn in (1.0, 0.01, 1e6, 3.0):
        restore()
        max_norm.fill_(mn)
        graph.replay()
        torch.cuda.synchronize()
        eager = _clone(params)
        for e, s_ in zip(eager, saved):
            e.grad.copy_(s_)
        total_e = FU.clip_grad_norm_(eager, torch.tensor(mn, device="cuda"), norm_type)
        assert_same_tensor(total, total_e, f"replayed total, max_norm={mn}")
        for p, e in zip(params, eager):
            assert_same_tensor(p.grad, e.grad, f"replayed grads, max_norm={mn}")
        torch_p = _clone(eager)
        for e, s_ in zip(torch_p, saved):
            e.grad.copy_(s_)
        torch.testing.assert_close(total, TU.clip_grad_norm_(torch_p, mn, norm_type), rtol=1e-2, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_cuda_mixed_devices(choice):
    """A list over CPU and CUDA (automatic backend: triton for the CUDA groups, the CPU ones on a CPU
    backend; an explicit triton backend cannot serve CPU tensors without the interpreter): the total
    on the first tensor's device, each grad clipped where it is."""
    g = torch.Generator().manual_seed(7)
    params = []
    for dev, dt, n in [("cpu", torch.float32, 33), ("cuda", torch.float32, 5000), ("cuda", torch.bfloat16, 17),
                       ("cpu", torch.float64, 7)]:
        p = torch.zeros(n, dtype=dt, device=dev).requires_grad_()
        p.grad = torch.randn(n, generator=g).to(dtype=dt, device=dev)
        params.append(p)
    for order in (params, params[1:] + params[:1]):
        eager, got = _clone(order), _clone(order)
        total_t = TU.clip_grad_norm_(eager, 0.5)
        with fusedstab.use_backend(None if choice == "auto" else choice):
            total = FU.clip_grad_norm_(got, 0.5)
        assert total.dtype == total_t.dtype and total.device == total_t.device, (total, total_t)
        torch.testing.assert_close(total, total_t, rtol=1e-2, atol=0)  # torch rounds the bf16 norm to bf16
        for a, e in zip(got, eager):
            assert a.grad.device == e.grad.device
            torch.testing.assert_close(a.grad, e.grad, rtol=1.6e-2, atol=1e-5)


@pytest.mark.gpu
def test_cuda_int64_indexing():
    """A tensor of more than 2^31 elements: the last elements are read and scaled."""
    n = 2**31 + 5
    try:
        big = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    big[-1] = 3.0
    with fusedstab.use_backend("triton"):
        total, per = FU.get_total_norm([big], INF, return_per_tensor=True)
        assert total.item() == 3.0
        total2, per2 = FU.get_total_norm([big], 2.0, return_per_tensor=True)
        expect = math.sqrt((n - 1) + 9.0)
        assert abs(per2.item() - expect) / expect < 1e-5
        FU.clip_grads_with_norm_([_holder(big)], 1.0, per2[0])
    assert abs(big[-1].float().item() - 3.0 / expect) / (3.0 / expect) < 1e-2
    assert abs(big[2**31].float().item() - 1.0 / expect) / (1.0 / expect) < 1e-2
    assert abs(big[0].float().item() - 1.0 / expect) / (1.0 / expect) < 1e-2


def _holder(grad):
    """A parameter for ``grad`` that costs no memory (an expanded one-element tensor)."""
    p = torch.empty(1, dtype=grad.dtype, device=grad.device).expand(grad.shape)
    p.grad = grad
    return p

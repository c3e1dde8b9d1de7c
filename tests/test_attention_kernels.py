"""Tests of the FlashAttention launchers (fusedstab.kernels.attention) against a float64 math reference.

CPU: the Triton interpreter (fp32, fp16, fp64; bf16 is unreliable there) on small shapes; the `gpu`
tests repeat the core cases on CUDA with bf16 and longer sequences.

Tolerances (tests/helpers.py):
- fp32 / fp64 against the float64 truth at TIGHT (1e-5 / 1e-10, absolute part relative to
  max(1, max|truth|)).
- fp16 / bf16, ``precise=True``: at most 2x the error of torch's own math path
  (F.scaled_dot_product_attention under SDPBackend.MATH, same dtype and inputs) vs the truth, plus
  helpers' floor. Since torch 2.5 that path upcasts to fp32 (allow_fp16_bf16_reduction_math_sdp is
  off): its error is little more than the output's rounding.
- fp16 / bf16, default (FlashAttention numerics): at most 2x the error of ``flash_numerics`` below,
  the float64 computation with FlashAttention-2's three roundings (P and dS rounded to the input
  dtype for the tensor-core products, delta from the rounded o): the numerics of torch's own CUDA
  flash kernel. Measured on CPU, these roundings put any such kernel at up to ~4x the math path's
  error (dq, dk) and ~2.2x that of torch's fused CPU kernel, which keeps P and dS in fp32: the
  math-path rule is met by the precise mode only, and the tests say so by checking both.

Dropout: the keep mask is recovered from the kernel itself (run with one-hot value columns: o = P *
keep / (1 - p)), checked for its statistics and its counter scheme, and then used in the reference for
the values and gradients of a run with real inputs.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusedstab.kernels import attention as A
from helpers import assert_matches, assert_same_nonfinite

NEG_INF = float("-inf")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _cpu_needs_interpreter(request):
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("device", "cpu") == "cpu" and not INTERPRET:
        pytest.skip("triton kernels on CPU tensors need TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------- references
def _scores(q, k, mask, causal, scale):
    """float64 scaled, masked scores with kv heads repeated for GQA; and the repeat factor."""
    G = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scale
    L, S = s.shape[-2:]
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), NEG_INF)
    return s, G


def _probs(s):
    """softmax rows; fully masked rows (and S == 0) give P = 0 without NaN, in values and gradients."""
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], NEG_INF)
    lse = torch.logsumexp(s.detach(), -1)
    empty = torch.isneginf(lse)[..., None]
    return torch.softmax(torch.where(empty, 0.0, s), -1) * ~empty, lse


def reference(q, k, v, mask=None, causal=False, scale=None, keep=None, dropout_p=0.0):
    """float64 math attention: (o, lse), lse the natural-log logsumexp of the scaled, masked scores;
    ``keep`` (B, Hq, L, S) bool applies dropout to the probabilities."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s, G = _scores(q, k, mask, causal, scale)
    p, lse = _probs(s)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v.double().repeat_interleave(G, 1), lse


def flash_numerics(q, k, v, do, mask, causal, scale):
    """o, dq, dk, dv (and dS) as FlashAttention-2 computes them, in q's dtype: exact float64 except that
    P and dS are rounded to q's dtype before their products and delta = rowsum(do * o) uses the rounded o."""
    dt = q.dtype
    r = lambda t: t.to(dt).double()
    s, G = _scores(q, k, mask, causal, scale)
    p, _ = _probs(s)
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    o = r(r(p) @ vv)
    ds = p * (do.double() @ vv.transpose(-1, -2) - (o * do.double()).sum(-1, keepdim=True))
    group = lambda t: t.view(t.shape[0], -1, G, *t.shape[2:]).sum(2)
    dq = r(ds) @ kk * scale
    dk = group(r(ds).transpose(-1, -2) @ q.double() * scale)
    dv = group(r(p).transpose(-1, -2) @ do.double())
    return o.to(dt), (dq.to(dt), dk.to(dt), dv.to(dt), ds.to(dt))


def torch_math(q, k, v, do, mask, causal, scale, mask_grad=False):
    """torch's math-path result in q's dtype and its gradients (of a full-shape float mask too when
    ``mask_grad``)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if mask_grad:
        mask = mask.contiguous().requires_grad_()
        leaves.append(mask)
    if causal and mask is not None:  # torch takes one or the other: fold causality into the mask
        tril = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, NEG_INF)
        causal = False
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(*leaves[:3], attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
    return o.detach(), torch.autograd.grad(o, leaves, do)


def make(B, Hq, Hkv, L, S, E, Ev, dtype=torch.float32, layout="contiguous", device="cpu"):
    """q, k, v and a do, randn; layout 'blhe' gives (B, L, H, E).transpose(1, 2) views."""
    def t(shape):
        if layout == "blhe":
            b, h, n, e = shape
            return torch.randn(b, n, h, e, device=device).to(dtype).transpose(1, 2)
        return torch.randn(shape, device=device).to(dtype)
    return t((B, Hq, L, E)), t((B, Hkv, S, E)), t((B, Hkv, S, Ev)), t((B, Hq, L, Ev))


def make_mask(kind, shape, B, Hq, L, S, dtype=torch.float32, empty_rows=(), device="cpu"):
    """None, or a mask of ``shape`` (broadcastable to (B, Hq, L, S)) expanded as the caller passes it:
    'bool' (~25% False), 'float' (additive, randn), 'float_inf' (additive with ~25% -inf).
    ``empty_rows``: query rows masked out entirely."""
    if kind is None:
        return None
    shape = tuple(shape)
    if kind == "bool":
        m = torch.rand(shape, device=device) > 0.25
    else:
        m = torch.randn(shape, dtype=torch.float64, device=device)
        if kind == "float_inf":
            m = m.masked_fill(torch.rand(shape, device=device) < 0.25, NEG_INF)
        m = m.to(dtype)
    if empty_rows:
        m = m.expand(B, Hq, L, S).clone()
        m[:, :, list(empty_rows), :] = False if m.dtype == torch.bool else NEG_INF
    return m.expand(B, Hq, L, S)


def truth(q, k, v, do, mask=None, causal=False, scale=None, keep=None, dropout_p=0.0, mask_grad=False):
    """float64 truth: o, lse, and [dq, dk, dv (, d full mask)] of sum(o * do)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    m = mask
    if mask_grad:
        m = mask.double().contiguous().requires_grad_()
        leaves.append(m)
    o, lse = reference(*leaves[:3], m, causal, scale, keep, dropout_p)
    g = torch.autograd.grad(o, leaves, do.double(), allow_unused=True)
    return o.detach(), lse, [x if x is not None else torch.zeros_like(l) for x, l in zip(g, leaves)]


def check(got, truth64, eager, what):
    """helpers.assert_matches; for fp32/fp64 ``eager`` is only a dtype/shape reference."""
    assert_matches(got, truth64, truth64.to(got.dtype) if eager is None else eager, what)


def check_lse(lse, truth64, dtype=torch.float32, what="lse"):
    """lse: natural log, fp32 (fp64 for fp64 input), -inf exactly on the fully masked rows."""
    assert lse.shape == truth64.shape and lse.dtype == dtype, (lse.shape, lse.dtype)
    ninf = torch.isneginf(truth64)
    assert torch.equal(torch.isneginf(lse), ninf), f"{what}: -inf rows differ"
    assert not torch.isnan(lse).any()
    if (~ninf).any():
        check(lse[~ninf], truth64[~ninf], None, what)


def run_both(q, k, v, do, mask=None, causal=False, scale=None, mask_grad=False, **kw):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, lse = A.attention_fwd(q, k, v, mask, causal=causal, scale=scale, **kw)
    grads = A.attention_bwd(do, q, k, v, o, lse, mask, causal=causal, scale=scale, mask_needs_grad=mask_grad, **kw)
    return o, lse, grads


def check_all(q, k, v, do, mask=None, causal=False, scale=None, mask_grad=False, precise=False):
    """Kernel vs float64 truth for o, lse, dq, dk, dv (and dmask); fp16/bf16 by the rules above."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, lse, (dq, dk, dv, dmask) = run_both(q, k, v, do, mask, causal, scale, mask_grad, precise=precise)
    to, tlse, tg = truth(q, k, v, do, mask, causal, scale, mask_grad=mask_grad)
    eo, eg = None, (None,) * 4
    if q.dtype in (torch.float16, torch.bfloat16):
        if precise:
            eo, eg = torch_math(q, k, v, do, mask, causal, scale, mask_grad)
        else:
            eo, eg = flash_numerics(q, k, v, do, mask, causal, scale)
    assert o.shape == to.shape and o.dtype == q.dtype
    check(o, to, eo, "o")
    check_lse(lse, tlse, torch.float64 if q.dtype == torch.float64 else torch.float32)
    for name, got, t64, e in zip(("dq", "dk", "dv"), (dq, dk, dv), tg[:3], eg):
        assert got.shape == t64.shape and got.dtype == q.dtype, name
        check(got, t64, e, name)
    if mask_grad:
        assert dmask.dtype == torch.float32 and dmask.shape == tg[3].shape
        if eg[3] is not None:  # the caller reduces dS and casts it to the mask's dtype
            check(dmask.to(q.dtype), tg[3], eg[3].to(q.dtype).expand_as(dmask), "dmask")
        else:
            check(dmask, tg[3], None, "dmask")
    else:
        assert dmask is None
    return o, lse, (dq, dk, dv, dmask)


# ----------------------------------------------------------------------------- values and gradients
# (B, Hq, Hkv, L, S, E, Ev, causal, mask kind, mask shape (None: full))
CASES = {
    "basic": (2, 2, 2, 16, 16, 16, 16, False, None, None),
    "tails_L<S": (1, 2, 2, 7, 33, 40, 40, False, None, None),
    "tails_L>S": (1, 2, 2, 33, 7, 16, 16, False, None, None),
    "one": (1, 1, 1, 1, 1, 16, 16, False, None, None),
    "E!=Ev": (1, 2, 1, 17, 20, 40, 24, False, None, None),
    "E80": (1, 1, 1, 9, 18, 80, 48, False, None, None),
    "gqa2": (2, 4, 2, 16, 33, 16, 16, False, None, None),
    "gqa4_causal": (1, 4, 1, 33, 33, 16, 16, True, None, None),
    "causal_L<S": (1, 2, 2, 7, 33, 16, 16, True, None, None),
    "causal_L>S": (1, 2, 2, 33, 7, 16, 16, True, None, None),
    "causal_square": (2, 1, 1, 33, 33, 64, 64, True, None, None),
    "bool": (2, 2, 1, 17, 33, 16, 16, False, "bool", None),
    "bool_causal": (1, 2, 2, 33, 17, 16, 16, True, "bool", None),
    "float": (1, 2, 2, 16, 33, 16, 16, False, "float", None),
    "float_inf": (1, 2, 1, 33, 16, 16, 24, False, "float_inf", None),
    "bcast_11LS": (2, 2, 2, 17, 20, 16, 16, False, "float_inf", (1, 1, 17, 20)),
    "bcast_B11S": (2, 2, 2, 17, 20, 16, 16, False, "bool", (2, 1, 1, 20)),
    "bcast_causal": (2, 4, 2, 20, 17, 16, 16, True, "float", (2, 1, 1, 17)),
}
LOWP_CASES = ["tails_L<S", "E!=Ev", "gqa2", "gqa4_causal", "causal_L>S", "bool_causal", "float_inf", "bcast_causal"]


def _case(name, dtype, layout="contiguous", device="cpu"):
    B, Hq, Hkv, L, S, E, Ev, causal, kind, mshape = CASES[name]
    q, k, v, do = make(B, Hq, Hkv, L, S, E, Ev, dtype, layout, device)
    mask = make_mask(kind, mshape or (B, Hq, L, S), B, Hq, L, S, dtype, device=device)
    return q, k, v, do, mask, causal


def _float_mask(mask):
    return mask is not None and mask.dtype != torch.bool


@pytest.mark.parametrize("name", list(CASES))
def test_fp32(name):
    q, k, v, do, mask, causal = _case(name, torch.float32)
    check_all(q, k, v, do, mask, causal, mask_grad=_float_mask(mask))


@pytest.mark.parametrize("name", ["tails_L<S", "gqa4_causal", "float_inf"])
def test_fp32_precise_is_a_no_op(name):
    q, k, v, do, mask, causal = _case(name, torch.float32)
    a = run_both(q, k, v, do, mask, causal)
    b = run_both(q, k, v, do, mask, causal, precise=True)
    for x, y in zip((a[0], a[1], *a[2][:3]), (b[0], b[1], *b[2][:3])):
        assert torch.equal(x, y)


@pytest.mark.parametrize("precise", [False, True], ids=["flash", "precise"])
@pytest.mark.parametrize("name", LOWP_CASES)
def test_fp16(name, precise):
    q, k, v, do, mask, causal = _case(name, torch.float16)
    check_all(q, k, v, do, mask, causal, mask_grad=_float_mask(mask), precise=precise)


@pytest.mark.parametrize("name", ["tails_L<S", "gqa4_causal", "float_inf"])
def test_fp64(name):
    q, k, v, do, mask, causal = _case(name, torch.float64)
    check_all(q, k, v, do, mask, causal, mask_grad=_float_mask(mask))


@pytest.mark.parametrize("precise", [False, True], ids=["flash", "precise"])
def test_fp16_with_fp32_mask(precise):
    q, k, v, do = make(1, 2, 2, 17, 20, 16, 16, torch.float16)
    mask = make_mask("float_inf", (1, 1, 17, 20), 1, 2, 17, 20, torch.float32)
    scale = 16 ** -0.5
    o, lse, (dq, dk, dv, _) = run_both(q, k, v, do, mask, precise=precise)
    if precise:
        eo, eg = torch_math(q, k, v, do, mask.half(), False, scale)  # torch wants the mask in q's dtype
    else:
        eo, eg = flash_numerics(q, k, v, do, mask, False, scale)
    to, tlse, tg = truth(q, k, v, do, mask)
    check(o, to, eo, "o")
    check_lse(lse, tlse)
    for name, got, t64, e in zip(("dq", "dk", "dv"), (dq, dk, dv), tg, eg):
        check(got, t64, e, name)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_scale(scale):
    q, k, v, do = make(1, 2, 2, 17, 17, 40, 40)
    check_all(q, k, v, do, None, True, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_inputs(dtype):
    """q/k/v/do as (B, L, H, E).transpose(1, 2) views (no copies); o comes back in q's (B, L, H) order,
    the gradients in their inputs' layouts; a head-dim slice of a wider tensor as well."""
    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 17, 33, 40, 24
    q, k, v, do = make(B, Hq, Hkv, L, S, E, Ev, dtype, layout="blhe")
    assert not q.is_contiguous()
    o, lse, (dq, dk, dv, _) = check_all(q, k, v, do, None, True)
    assert o.transpose(1, 2).is_contiguous()
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()
    qs = torch.randn(B, Hq, L, 2 * E).to(dtype)[..., :E]
    check_all(qs, k, v, do, None, False)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
@pytest.mark.parametrize("L,S", [(7, 50), (50, 7), (45, 45)])
def test_unequal_blocks(monkeypatch, blocks, L, S):
    """BLOCK_M != BLOCK_N (as on the GPU): the causal loop bounds and the blocks on the diagonal."""
    monkeypatch.setattr(A, "INTERPRET_BLOCKS", blocks)
    q, k, v, do = make(1, 2, 1, L, S, 16, 16)
    mask = make_mask("float_inf", (1, 1, L, S), 1, 2, L, S)
    check_all(q, k, v, do, None, True)
    check_all(q, k, v, do, mask, True, mask_grad=True)


# ----------------------------------------------------------------------------- fully masked rows, empty
@pytest.mark.parametrize("kind", ["bool", "float_inf"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_fp32(kind, causal):
    B, Hq, Hkv, L, S, E = 1, 2, 1, 20, 17, 16
    q, k, v, do = make(B, Hq, Hkv, L, S, E, E)
    rows = [0, 5, 19]
    mask = make_mask(kind, (B, Hq, L, S), B, Hq, L, S, empty_rows=rows)
    o, lse, (dq, dk, dv, dmask) = check_all(q, k, v, do, mask, causal, mask_grad=kind != "bool")
    assert torch.all(o[:, :, rows] == 0) and torch.all(torch.isneginf(lse[:, :, rows]))
    assert torch.all(dq[:, :, rows] == 0)
    for t in (o, dq, dk, dv) + ((dmask,) if dmask is not None else ()):
        assert torch.isfinite(t).all()
    if dmask is not None:
        assert torch.all(dmask[:, :, rows] == 0)
    # the masked rows add nothing to dk, dv: the same as without those rows at all
    if not causal:
        others = [i for i in range(L) if i not in rows]
        _, _, (_, dk2, dv2, _) = run_both(q[:, :, others], k, v, do[:, :, others], mask[:, :, others])
        torch.testing.assert_close(dk, dk2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dv, dv2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precise", [False, True], ids=["flash", "precise"])
def test_fully_masked_rows_fp16(precise):
    """fp16: o = 0, dq = 0 and no NaN on masked rows; the rest by the fp16 rules, against torch on the
    same problem without those rows (torch's own result is NaN on them)."""
    B, Hq, Hkv, L, S, E = 1, 2, 2, 20, 17, 16
    q, k, v, do = make(B, Hq, Hkv, L, S, E, E, torch.float16)
    rows = [3, 4, 16]
    mask = make_mask("bool", (B, Hq, L, S), B, Hq, L, S, empty_rows=rows)
    o, lse, (dq, dk, dv, _) = run_both(q, k, v, do, mask, precise=precise)
    for t in (o, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.all(o[:, :, rows] == 0) and torch.all(dq[:, :, rows] == 0)
    others = [i for i in range(L) if i not in rows]
    sub = lambda t: t[:, :, others]
    if precise:
        eo, eg = torch_math(sub(q), k, v, sub(do), sub(mask), False, E ** -0.5)
    else:
        eo, eg = flash_numerics(sub(q), k, v, sub(do), sub(mask), False, E ** -0.5)
    to, tlse, tg = truth(q, k, v, do, mask)
    check(sub(o), sub(to), eo, "o")
    check_lse(lse, tlse)
    check(sub(dq), sub(tg[0]), eg[0], "dq")
    check(dk, tg[1], eg[1], "dk")
    check(dv, tg[2], eg[2], "dv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_keys(dtype):
    """S == 0: o = 0, lse = -inf, dq = 0, no NaN."""
    q, k, v, do = make(2, 4, 2, 9, 0, 16, 24, dtype)
    for causal in (False, True):
        o, lse, (dq, dk, dv, dmask) = run_both(q, k, v, do, None, causal)
        assert o.shape == (2, 4, 9, 24) and o.dtype == dtype and torch.all(o == 0)
        assert lse.shape == (2, 4, 9) and lse.dtype == torch.float32 and torch.all(torch.isneginf(lse))
        assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape and dmask is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_queries(dtype):
    q, k, v, do = make(2, 4, 2, 0, 9, 16, 24, dtype)
    mask = make_mask("float", (2, 4, 0, 9), 2, 4, 0, 9)
    o, lse, (dq, dk, dv, dmask) = run_both(q, k, v, do, mask, True, mask_grad=True)
    assert o.shape == (2, 4, 0, 24) and lse.shape == (2, 4, 0) and dq.shape == q.shape
    assert torch.all(dk == 0) and torch.all(dv == 0) and dmask.shape == (2, 4, 0, 9)
    q, k, v, do = make(0, 4, 2, 5, 9, 16, 24, dtype)  # no batch
    o, lse, (dq, dk, dv, _) = run_both(q, k, v, do)
    assert o.shape == (0, 4, 5, 24) and dk.shape == k.shape


def test_deterministic():
    """No atomics: two backward runs agree bit for bit (GQA group sums included)."""
    q, k, v, do = make(1, 4, 1, 33, 33, 16, 16)
    a = run_both(q, k, v, do, None, True)
    b = run_both(q, k, v, do, None, True)
    for x, y in zip(a[2][:3], b[2][:3]):
        assert torch.equal(x, y)


def test_allow_tf32_accepted():
    q, k, v, do = make(1, 2, 1, 16, 17, 16, 16)
    o, lse, (dq, _, _, _) = run_both(q, k, v, do, None, True, allow_tf32=True)
    to, _, tg = truth(q, k, v, do, None, True)
    torch.testing.assert_close(o.double(), to, rtol=2e-2, atol=2e-2)  # tf32 on a GPU: 10-bit mantissa
    torch.testing.assert_close(dq.double(), tg[0], rtol=2e-2, atol=2e-2)


NONFINITE = [("q-nan", "q", (0, 0, 1, 2), float("nan")), ("k-nan", "k", (0, 1, 3, 0), float("nan")),
             ("v-nan", "v", (0, 1, 3, 0), float("nan")), ("v-inf", "v", (0, 1, 3, 0), float("inf")),
             ("q-inf", "q", (0, 0, 1, 2), float("inf")),
             ("k-inf", "k", (0, 1, 3, 0), float("inf")), ("k-neg-inf", "k", (0, 0, 2, 1), NEG_INF),
             ("mask-nan", "m", (0, 0, 2, 3), float("nan")), ("mask-plus-inf", "m", (0, 0, 2, 3), float("inf"))]


@pytest.mark.parametrize("L,S", [(4, 5), (20, 21)])
@pytest.mark.parametrize("case", NONFINITE, ids=[c[0] for c in NONFINITE])
def test_nonfinite_inputs_like_torch(case, L, S):
    """A NaN or an inf in q, k, v or the mask: torch's NaN/Inf pattern in o and every gradient, and its
    finite values. Zero-filled rows past L must not turn an inf key into NaN gradients."""
    _, which, idx, val = case
    q, k, v, do = make(1, 2, 2, L, S, 8, 6)
    m = make_mask("float", (1, 1, L, S), 1, 2, L, S).contiguous()
    dict(q=q, k=k, v=v, m=m)[which][idx] = val
    m = m.expand(1, 2, L, S)
    o, lse, (dq, dk, dv, dmask) = run_both(q, k, v, do, m, mask_grad=True)
    eo, eg = torch_math(q, k, v, do, m, False, 8 ** -0.5, mask_grad=True)
    assert_same_nonfinite(o, eo, "o", atol=1e-5)
    for name, got, e in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dmask), eg):
        assert_same_nonfinite(got, e, name, atol=1e-5)


# ----------------------------------------------------------------------------- dropout
def keep_mask(q, k, causal=False, mask=None, p=0.3, seed=0, offset=0):
    """The kernel's keep mask, read off o with one-hot value columns: o[..., i, j] = P_ij keep_ij / (1 - p)
    (which is checked too). Needs S <= 256; only meaningful where P > 0 (returned as well)."""
    B, Hkv, S, _ = k.shape
    v = torch.eye(S, dtype=q.dtype).expand(B, Hkv, S, S)
    o, _ = A.attention_fwd(q, k, v, mask, causal=causal, scale=q.shape[-1] ** -0.5, dropout_p=p, seed=seed,
                           offset=offset)
    P, _ = reference(q, k, v, mask, causal)
    keep = o.double() > 0
    torch.testing.assert_close(o.double(), torch.where(keep, P / (1 - p), 0.0), rtol=1e-5, atol=1e-6)
    return keep, P > 0


def test_dropout_keep_statistics():
    B, Hq, L, S = 2, 4, 48, 48
    q, k, _, _ = make(B, Hq, 2, L, S, 16, 16)
    for p in (0.1, 0.5):
        keep, visible = keep_mask(q, k, p=p, seed=1234)
        assert visible.all()
        n = keep.numel()
        rate = keep.double().mean().item()
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(rate - (1 - p)) < 5 * sd, (p, rate)
        # no structure along heads, query rows or key columns: each slice's rate within 5 sd of 1 - p
        for dim in (1, 2, 3):
            rates = keep.double().transpose(dim, -1).reshape(-1, keep.shape[dim]).mean(0)
            assert (rates - (1 - p)).abs().max() < 5 * (p * (1 - p) / (n // keep.shape[dim])) ** 0.5, (p, dim)


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) in numpy, as triton's tl.philox computes it: key = the 64-bit
    seed's (low, high) words; returns the four output words."""
    import numpy as np

    M32 = np.uint64(0xFFFFFFFF)
    A, Bm = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    c = [np.asarray(x, dtype=np.uint64) & M32 for x in np.broadcast_arrays(c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(rounds):
        p0, p1 = A * c[0], Bm * c[2]  # 64-bit products of 32-bit words: no overflow
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & M32, p1 & M32,
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & M32, p0 & M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    return c


def expected_keep(B, Hq, L, S, p, seed, offset):
    """keep(b, h, i, j): word j % 4 of Philox(seed; j // 4, i, b * Hq + h, offset), >> 8, >= p * 2^24."""
    import numpy as np

    j = np.arange(S)
    i = np.arange(L)[:, None]
    out = np.zeros((B, Hq, L, S), dtype=bool)
    for b in range(B):
        for h in range(Hq):
            words = philox4x32(seed, j[None, :] // 4, i, b * Hq + h, offset)
            r = np.stack(np.broadcast_arrays(*words))[j % 4, i, j[None, :]]
            out[b, h] = (r >> np.uint64(8)) >= round(p * (1 << 24))
    return torch.from_numpy(out)


def test_dropout_counter_scheme(monkeypatch):
    """The keep mask is exactly word j % 4 of Philox4x32-10(seed; j // 4, i, b * Hq + h, offset) >> 8 >=
    p * 2^24 (checked against an independent Philox): reproducible, another seed or offset gives
    another mask, the block sizes do not matter (forward and backward use other blocks)."""
    B, Hq, L, S, p = 2, 2, 20, 24, 0.3
    q, k, _, _ = make(B, Hq, 1, L, S, 16, 16)
    seed = 2 ** 40 + 7  # a 64-bit seed
    keep, visible = keep_mask(q, k, p=p, seed=seed, offset=5)
    assert visible.all()
    assert torch.equal(keep, expected_keep(B, Hq, L, S, p, seed, 5))
    again, _ = keep_mask(q, k, p=p, seed=seed, offset=5)
    assert torch.equal(keep, again)
    other_seed, _ = keep_mask(q, k, p=p, seed=3, offset=5)
    assert (keep != other_seed).double().mean() > 0.2
    other_offset, _ = keep_mask(q, k, p=p, seed=seed, offset=6)
    assert (keep != other_offset).double().mean() > 0.2
    monkeypatch.setattr(A, "INTERPRET_BLOCKS", (32, 16))
    blocks, _ = keep_mask(q, k, p=p, seed=seed, offset=5)
    assert torch.equal(blocks, keep)


@pytest.mark.parametrize("causal,kind,gqa", [(False, None, 2), (True, "float_inf", 1), (False, "bool", 4)])
def test_dropout_values_and_grads(causal, kind, gqa):
    """o and dq, dk, dv (dmask) with dropout against the reference using the forward's own keep mask:
    the backward regenerates the same mask."""
    B, Hq, L, S, E, Ev, p, seed, offset = 1, 4, 17, 40, 16, 24, 0.3, 77, 1000
    q, k, v, do = make(B, Hq, Hq // gqa, L, S, E, Ev)
    mask = make_mask(kind, (B, 1, L, S), B, Hq, L, S)
    keep, _ = keep_mask(q, k, causal, mask, p, seed, offset)
    mg = _float_mask(mask)
    o, lse, grads = run_both(q, k, v, do, mask, causal, dropout_p=p, seed=seed, offset=offset, mask_grad=mg)
    to, tlse, tg = truth(q, k, v, do, mask, causal, keep=keep, dropout_p=p, mask_grad=mg)
    check(o, to, None, "o")
    check_lse(lse, tlse)  # the lse of the probabilities before dropout
    for name, got, t64 in zip(("dq", "dk", "dv", "dmask"), grads, tg):
        if got is not None:
            check(got, t64, None, name)


def test_dropout_precise_fp16():
    """The precise fp16 backward with dropout: its delta pass regenerates the mask too."""
    B, Hq, L, S, E, p, seed = 1, 2, 17, 24, 16, 0.25, 5
    q, k, v, do = make(B, Hq, 1, L, S, E, E, torch.float16)
    keep, _ = keep_mask(q.float(), k.float(), True, None, p, seed)  # the mask does not depend on the dtype
    o, lse, (dq, dk, dv, _) = run_both(q, k, v, do, None, True, dropout_p=p, seed=seed, precise=True)
    to, _, tg = truth(q, k, v, do, None, True, keep=keep, dropout_p=p)
    # torch has no run with this mask; its math path is the truth rounded to fp16 (+ a little), so
    # hold the results to 2x the error of the correctly rounded truth
    for name, got, t64 in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), (to, *tg)):
        check(got, t64, t64.to(got.dtype), name)


def test_dropout_p_one():
    q, k, v, do = make(1, 2, 1, 17, 20, 16, 16)
    o, lse, (dq, dk, dv, _) = run_both(q, k, v, do, None, True, dropout_p=1.0, seed=3)
    assert torch.all(o == 0) and torch.isfinite(lse).all()
    for t in (dq, dk, dv):
        assert torch.all(t == 0)


# ----------------------------------------------------------------------------- errors
def test_errors():
    q, k, v, do = make(1, 3, 2, 4, 4, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        A.attention_fwd(q, k, v, scale=1.0)
    q, k, v, do = make(1, 2, 2, 4, 4, 16, 16)
    with pytest.raises(ValueError, match="shapes"):
        A.attention_fwd(q, k[..., :8], v, scale=1.0)
    with pytest.raises(ValueError, match="broadcast"):
        A.attention_fwd(q, k, v, torch.ones(3, 4, dtype=torch.bool), scale=1.0)
    with pytest.raises(ValueError, match="one dtype"):
        A.attention_fwd(q, k.half(), v, scale=1.0)
    with pytest.raises(NotImplementedError, match="head dims"):
        A.attention_fwd(torch.randn(1, 1, 2, 272), torch.randn(1, 1, 2, 272), torch.randn(1, 1, 2, 16), scale=1.0)
    with pytest.raises(NotImplementedError):
        A.attention_fwd(q.int(), k.int(), v.int(), scale=1.0)
    o, lse = A.attention_fwd(q, k, v, scale=1.0)
    with pytest.raises(ValueError, match="additive"):
        A.attention_bwd(do, q, k, v, o, lse, torch.ones(4, 4, dtype=torch.bool), scale=1.0, mask_needs_grad=True)
    with pytest.raises(ValueError, match="dropout_p"):
        A.attention_fwd(q, k, v, scale=1.0, dropout_p=1.5)


# ----------------------------------------------------------------------------- GPU (bf16, real block sizes)
GPU_SHAPES = [  # (B, Hq, Hkv, L, S, E, Ev, causal, mask kind)
    (2, 8, 2, 1000, 1000, 64, 64, True, None),
    (1, 4, 4, 257, 777, 128, 128, False, "float_inf"),
    (1, 4, 1, 777, 257, 80, 80, True, "bool"),
    (1, 2, 2, 300, 300, 256, 200, False, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("precise", [False, True], ids=["flash", "precise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}-{s[8]}")
@pytest.mark.parametrize("device", ["cuda"])
def test_gpu(device, shape, dtype, precise):
    B, Hq, Hkv, L, S, E, Ev, causal, kind = shape
    q, k, v, do = make(B, Hq, Hkv, L, S, E, Ev, dtype, "blhe", device)
    mask = make_mask(kind, (1, Hq, L, S), B, Hq, L, S, dtype, device=device)
    check_all(q, k, v, do, mask, causal, mask_grad=_float_mask(mask), precise=precise)

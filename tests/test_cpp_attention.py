"""Direct calls of the C++ CPU attention kernels, ``torch.ops.fusedstab_C.attention_fwd`` / ``attention_bwd``
(csrc/cpu/attention.cpp): what the public-API tests (test_attention.py, which run on this backend too)
cannot reach.

- Parity sweep against the float64 reference (fusedstab.reference) in every dtype: shapes that cross the
  kernels' tiles (forward 128 x 512, backward 64 x 128), GQA, causal with L < S and L > S, bool and
  additive masks (expanded, stride 0), strided inputs and outputs, head dims past 256, fully masked
  rows; on 1 and 2 threads (2 threads split a head's key blocks between items, with dq partials).
  fp32/fp64 tight; fp16/bf16 at most 2x eager torch's own error (torch's CPU kernels compute in fp32).
- Dropout: the keep mask read off the forward (one-hot value columns: o = P keep / (1 - p)) is a pure
  function of (seed, offset + ((b * Hq + h) * L + i) * S + j), has the right rate, and the backward
  regenerates it (gradients equal the reference's with that mask); bitwise the same on 1 and 2 threads.
- Determinism (bitwise, run to run) and no writes outside the outputs' elements.
- Bad arguments raise a clear error: every input's and output's dtype, shape, last-dim stride, device,
  overlapping outputs, the mask's dtype and shape, heads, dropout_p.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedstab import reference as R

NEG_INF = float("-inf")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(getattr(request, "param", 1))
    yield torch.get_num_threads()
    torch.set_num_threads(n)


def _acc(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def fwd(C, q, k, v, mask=None, causal=False, scale=None, p=0.0, seed=0, offset=0, o=None, lse=None):
    B, Hq, L, E = q.shape
    scale = E ** -0.5 if scale is None else scale
    o = torch.empty(B, Hq, L, v.shape[-1], dtype=q.dtype) if o is None else o
    lse = torch.empty(B, Hq, L, dtype=_acc(q.dtype)) if lse is None else lse
    C.attention_fwd(q, k, v, mask, causal, scale, p, seed, offset, o, lse)
    return o, lse


def bwd(C, do, q, k, v, o, lse, mask=None, causal=False, scale=None, p=0.0, seed=0, offset=0, dmask=False,
        outs=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if outs is None:
        dm = (torch.zeros(*q.shape[:3], k.shape[2], dtype=_acc(q.dtype)) if dmask
              else torch.empty(0, dtype=_acc(q.dtype)))
        outs = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm
    C.attention_bwd(do, q, k, v, o, lse, mask, causal, scale, p, seed, offset, *outs)
    return outs


def _d(t):
    return None if t is None else (t if t.dtype == torch.bool else t.double())


def truth(q, k, v, do, mask, causal, scale=None, keep=None, p=0.0):
    """float64 (o, lse, dq, dk, dv, dS) of the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd, md = _d(q), _d(k), _d(v), _d(mask)
    o = R.scaled_dot_product_attention(qd, kd, vd, md, p, causal, scale, keep)
    lse = torch.logsumexp(R.attention_scores(qd, kd, md, causal, scale), -1)
    return (o, lse, *R.attention_bwd(do.double(), qd, kd, vd, md, p, causal, scale, keep))


def eager(q, k, v, do, mask, causal):
    """Eager torch in q's dtype (causality merged into the mask, as torch takes one or the other)."""
    L, S = q.shape[2], k.shape[2]
    if causal:
        tri = torch.ones(L, S, dtype=torch.bool).tril()
        mask = tri if mask is None else (mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, NEG_INF))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mleaf = mask.detach().clone().requires_grad_() if mask is not None and mask.dtype != torch.bool else mask
    out = F.scaled_dot_product_attention(*leaves, mleaf, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(do)
    return (out, *(t.grad for t in leaves), None if mleaf is None or mask.dtype == torch.bool else mleaf.grad)


def err(got, want):
    """max |got - want| relative to max(1, max |want|), where both are finite (eager torch gives NaN on
    fully masked rows; the kernel's results are checked to be finite separately)."""
    got, want = got.double(), want.double()
    fin = torch.isfinite(want) & torch.isfinite(got)
    if not fin.any():
        return 0.0
    return ((got - want).abs()[fin].max() / want[fin].abs().max().clamp(min=1.0)).item()


TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def assert_close(got, want, rtol, atol):
    """(torch.testing.assert_close's first call imports for seconds.)"""
    bad = (got.double() - want.double()).abs() > atol + rtol * want.double().abs()
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements differ"


def check(name, got, want, ref_err=None, dt=torch.float32):
    e = err(got, want)
    bound = TOL[dt] if dt in TOL else 2.0 * ref_err + 1e-4
    assert e <= bound, f"{name} ({dt}): error {e:.3e} > {bound:.3e}" + (
        f" (eager torch's {ref_err:.3e})" if ref_err is not None else "")


# ============================================================================= parity sweep
# (id, q shape, k shape, Ev, mask kind, causal)
CASES = [
    ("tiles", (1, 2, 130, 8), (1, 2, 530, 8), 8, None, False),     # 2 forward key blocks, 3 bwd query blocks
    ("causal-L<S", (1, 2, 130, 16), (1, 2, 531, 16), 12, None, True),
    ("causal-L>S-gqa", (2, 4, 197, 8), (2, 2, 67, 8), 8, None, True),
    ("gqa-4-1-bool", (1, 4, 37, 16), (1, 1, 141, 16), 24, "bool", False),
    ("add-causal", (2, 2, 70, 8), (2, 1, 129, 8), 5, "add", True),
    ("add-qdtype", (1, 3, 65, 8), (1, 3, 200, 8), 8, "add-q", False),
    ("one", (1, 1, 1, 4), (1, 1, 1, 4), 3, None, False),
    ("E300", (1, 1, 9, 300), (1, 1, 11, 300), 260, None, False),
]


def make_mask(kind, B, Hq, L, S, dtype):
    """A (B, Hq, L, S) view expanded over the heads (stride 0), with a fully masked query row 2."""
    if kind == "bool":
        m = torch.rand(B, 1, L, S) < 0.7
        m[:, :, 2] = False
    else:
        m = torch.randn(B, 1, L, S).masked_fill(torch.rand(B, 1, L, S) < 0.1, NEG_INF)
        m[:, :, 2] = NEG_INF
        m = m.to(torch.float32 if kind == "add" else dtype)
    return m.expand(B, Hq, L, S)


# Every case on 1 thread; on 2 threads (a head's key blocks split between 2-4 items, dq in partials)
# those with few (batch, kv head) pairs.
PARITY = [pytest.param(1, *c, id=f"{c[0]}-1thread") for c in CASES] + [
    pytest.param(2, *c, id=f"{c[0]}-2threads") for c in CASES if c[0] in ("tiles", "gqa-4-1-bool", "add-qdtype")]


@pytest.mark.parametrize("threads,cid,qs,ks,Ev,mk,causal", PARITY, indirect=["threads"])
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d)[6:])
def test_parity(C, threads, cid, qs, ks, Ev, mk, causal, dt):
    (B, Hq, L, E), S = qs, ks[2]
    q, k = torch.randn(qs).to(dt), torch.randn(ks).to(dt)
    v = torch.randn(*ks[:3], Ev).to(dt)
    do = torch.randn(B, Hq, L, Ev).to(dt)
    mask = None if mk is None else make_mask(mk, B, Hq, L, S, dt)
    o, lse = fwd(C, q, k, v, mask, causal)
    dq, dk, dv, dm = bwd(C, do, q, k, v, o, lse, mask, causal, dmask=mk is not None and mk != "bool")
    to, tlse, tdq, tdk, tdv, tds = truth(q, k, v, do, mask, causal)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(tlse)) and not lse.isnan().any()
    assert all(torch.isfinite(t).all() for t in (o, dq, dk, dv, dm)), "no NaN/inf anywhere"
    ref = [None] * 5
    if dt in (torch.float16, torch.bfloat16):
        eo, edq, edk, edv, edm = eager(q, k, v, do, mask, causal)
        ref = [err(eo, to), err(edq, tdq), err(edk, tdk), err(edv, tdv), None if edm is None else err(edm, tds)]
    check("lse", lse, tlse, 0.0, torch.float32 if dt != torch.float64 else dt)
    for name, got, want, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), (to, tdq, tdk, tdv), ref):
        check(name, got, want, r, dt)
    if dm.numel():
        check("dmask", dm, tds, ref[4], dt if ref[4] is not None else _acc(dt))
    if mask is not None:  # the fully masked row: o = 0, lse = -inf, dq = 0
        assert (o[:, :, 2] == 0).all() and torch.isneginf(lse[:, :, 2]).all() and (dq[:, :, 2] == 0).all()


@pytest.mark.parametrize("dt", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
def test_strided_inputs_and_outputs(C, threads, dt):
    """(B, L, H, E) memory transposed to (B, H, L, E) for every operand, outputs padded in a larger buffer
    (nothing outside their elements is written) and a mask with a strided key dim."""
    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 70, 140, 16, 12
    blhe = lambda h, n, e: torch.randn(B, n, h, e).to(dt).transpose(1, 2)  # noqa: E731
    q, k, v, do = blhe(Hq, L, E), blhe(Hkv, S, E), blhe(Hkv, S, Ev), blhe(Hq, L, Ev)
    mask = torch.randn(B, Hq, L, 2 * S)[..., ::2]

    def padded(h, n, e):  # (B, h, n, e) view of a (B, n, h, e + 3) buffer of 7s
        buf = torch.full((B, n, h, e + 3), 7.0, dtype=dt)
        return buf, buf[..., :e].transpose(1, 2)

    (ob, o), (qb, dq), (kb, dk), (vb, dv) = padded(Hq, L, Ev), padded(Hq, L, E), padded(Hkv, S, E), padded(Hkv, S, Ev)
    fwd(C, q, k, v, mask, True, o=o, lse=torch.empty(B, Hq, L, dtype=_acc(dt)))
    o_ref, lse = fwd(C, q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(), True)
    assert torch.equal(o, o_ref)
    bwd(C, do, q, k, v, o, lse, mask, True, outs=(dq, dk, dv, torch.empty(0)))
    refs = bwd(C, do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), o_ref, lse, mask.contiguous(), True)
    for got, want in zip((dq, dk, dv), refs):
        assert_close(got, want, rtol=1e-6, atol=1e-6)
    for buf, e in ((ob, Ev), (qb, E), (kb, E), (vb, Ev)):
        assert (buf[..., e:] == 7).all(), "a write outside the output's elements"


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=["1thread", "2threads"])
def test_deterministic(C, threads):
    """Bitwise the same run to run (fresh outputs each time), with GQA, a mask and dropout."""
    q, k, v = torch.randn(1, 4, 150, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    do = torch.randn(1, 4, 150, 16)
    mask = torch.randn(1, 4, 150, 300)
    runs = []
    for _ in range(3):
        o, lse = fwd(C, q, k, v, mask, False, p=0.2, seed=7, offset=3)
        runs.append((o, lse, *bwd(C, do, q, k, v, o, lse, mask, False, p=0.2, seed=7, offset=3, dmask=True)))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


# ============================================================================= dropout
def keep_mask(C, q, k, p, seed, offset, causal=False, mask=None):
    """The forward's keep mask, read off o with one-hot value columns (v = I: o = P keep / (1 - p))."""
    B, Hkv, S = k.shape[0], k.shape[1], k.shape[2]
    v = torch.eye(S, dtype=q.dtype).expand(B, Hkv, S, S)
    o, _ = fwd(C, q, k, v, mask, causal, p=p, seed=seed, offset=offset)
    P = torch.softmax(R.attention_scores(q.double(), k.double(), _d(mask), causal, q.shape[-1] ** -0.5), -1)
    keep = o > 0
    assert_close(o, torch.where(keep, P / (1 - p), 0.0), rtol=1e-5, atol=1e-7)
    return keep, P > 0


def test_dropout_keep_statistics_and_counter(C):
    B, H, L, S = 2, 3, 40, 530  # S > 512: crosses a forward key block
    q, k = torch.randn(B, H, L, 8) * 0.3, torch.randn(B, H, S, 8) * 0.3
    for p in (0.1, 0.5, 0.9):
        keep, visible = keep_mask(C, q, k, p, seed=123, offset=0)
        assert visible.all()
        n = keep.numel()
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, (p, rate)
        # neighbours (the 4 outputs of one Philox call, adjacent counters) are uncorrelated
        a, b = keep[..., :-1].double().flatten(), keep[..., 1:].double().flatten()
        corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(corr.item()) < 5 / a.numel() ** 0.5, (p, corr.item())
    keep, _ = keep_mask(C, q, k, 0.3, seed=5, offset=11)
    again, _ = keep_mask(C, q, k, 0.3, seed=5, offset=11)
    assert torch.equal(keep, again)
    other, _ = keep_mask(C, q, k, 0.3, seed=6, offset=11)
    assert (keep != other).double().mean() > 0.2
    # the counter is offset + ((b * H + h) * L + i) * S + j
    assert torch.equal(keep_mask(C, q, k, 0.3, 5, 11 + 1)[0][..., :-1], keep[..., 1:])
    assert torch.equal(keep_mask(C, q, k, 0.3, 5, 11 + S)[0][:, :, :-1], keep[:, :, 1:])
    assert torch.equal(keep_mask(C, q, k, 0.3, 5, 11 + L * S)[0][0, :-1], keep[0, 1:])


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=["1thread", "2threads"])
@pytest.mark.parametrize("dt", (torch.float64, torch.float32), ids=lambda d: str(d)[6:])
def test_dropout_backward_regenerates_the_mask(C, threads, dt):
    """Gradients with dropout equal the reference's under the keep mask read off the forward."""
    B, Hq, Hkv, L, S = 1, 4, 2, 70, 150
    q, k = torch.randn(B, Hq, L, 8, dtype=dt), torch.randn(B, Hkv, S, 8, dtype=dt)
    v, do = torch.randn(B, Hkv, S, 6, dtype=dt), torch.randn(B, Hq, L, 6, dtype=dt)
    mask = torch.randn(B, Hq, L, S, dtype=dt)
    p, seed, offset = 0.25, 99, 1000
    keep, _ = keep_mask(C, q, k, p, seed, offset, True, mask)
    o, lse = fwd(C, q, k, v, mask, True, p=p, seed=seed, offset=offset)
    grads = bwd(C, do, q, k, v, o, lse, mask, True, p=p, seed=seed, offset=offset, dmask=True)
    # keep as float64: reference.attention_bwd's bool keep * (1 / (1 - p)) is an fp32 tensor (the scale
    # rounded to fp32, a 3e-8 relative error in every fp64 gradient)
    t = truth(q, k, v, do, mask, True, keep=keep.double(), p=p)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv", "dmask"), (o, lse, *grads), t):
        check(name, got, want, dt=dt)


def test_dropout_same_on_any_thread_count(C):
    q, k, v = torch.randn(2, 2, 150, 8), torch.randn(2, 1, 600, 8), torch.randn(2, 1, 600, 8)
    do = torch.randn(2, 2, 150, 8)
    n, res = torch.get_num_threads(), []
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            o, lse = fwd(C, q, k, v, None, True, p=0.4, seed=3, offset=0)
            res.append((o, lse, *bwd(C, do, q, k, v, o, lse, None, True, p=0.4, seed=3, offset=0)))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*res):  # the forward bitwise; dq is summed over another number of key-block sets
        assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_dropout_p_one(C):
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    o, lse = fwd(C, q, k, v, p=1.0, seed=1)
    assert (o == 0).all() and torch.isfinite(lse).all()
    dq, dk, dv, _ = bwd(C, torch.randn_like(o), q, k, v, o, lse, p=1.0, seed=1)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


# ============================================================================= bad arguments
def _valid(dt=torch.float32):
    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 5, 7, 8, 6
    a = dict(q=torch.randn(B, Hq, L, E, dtype=dt), k=torch.randn(B, Hkv, S, E, dtype=dt),
             v=torch.randn(B, Hkv, S, Ev, dtype=dt), mask=torch.zeros(B, Hq, L, S), causal=False, scale=0.3,
             dropout_p=0.0, seed=0, offset=0, o=torch.empty(B, Hq, L, Ev, dtype=dt),
             lse=torch.empty(B, Hq, L))
    b = dict(dout=torch.randn(B, Hq, L, Ev, dtype=dt), q=a["q"], k=a["k"], v=a["v"], o=torch.randn(B, Hq, L, Ev),
             lse=torch.randn(B, Hq, L), mask=a["mask"], causal=False, scale=0.3, dropout_p=0.0, seed=0, offset=0,
             dq=torch.empty_like(a["q"]), dk=torch.empty_like(a["k"]), dv=torch.empty_like(a["v"]),
             dmask=torch.zeros(B, Hq, L, S))
    return a, b


def _strided(t):  # same shape, last dim stride 2
    return torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]


# (id, op, argument, replacement(valid args) -> value, message fragment)
BAD = [
    ("q-int", "fwd", "q", lambda a: a["q"].int(), "must be float32, float64, float16 or bfloat16"),
    ("q-3d", "fwd", "q", lambda a: a["q"][0], "must be 4-D"),
    ("k-dtype", "fwd", "k", lambda a: a["k"].double(), "k must be Float"),
    ("k-E", "fwd", "k", lambda a: a["k"][..., :5], "k must have shape"),
    ("k-B", "fwd", "k", lambda a: a["k"][:1], "k must have shape"),
    ("v-S", "fwd", "v", lambda a: a["v"][:, :, :3], "v must have shape"),
    ("v-dtype", "fwd", "v", lambda a: a["v"].half(), "v must be Float"),
    ("heads", "fwd", "q", lambda a: torch.randn(2, 3, 5, 8), "multiple of the kv heads"),
    ("q-stride", "fwd", "q", lambda a: _strided(a["q"]), "unit-stride last dim"),
    ("k-stride", "fwd", "k", lambda a: _strided(a["k"]), "unit-stride last dim"),
    ("v-stride", "fwd", "v", lambda a: _strided(a["v"]), "unit-stride last dim"),
    ("q-meta", "fwd", "q", lambda a: a["q"].to("meta"), ""),
    ("mask-int", "fwd", "mask", lambda a: a["mask"].int(), "mask must be bool, float32 or q's dtype"),
    ("mask-half", "fwd", "mask", lambda a: a["mask"].half(), "mask must be bool, float32 or q's dtype"),
    ("mask-shape", "fwd", "mask", lambda a: torch.zeros(2, 4, 5, 8), "mask must have shape"),
    ("mask-3d", "fwd", "mask", lambda a: torch.zeros(4, 5, 7), "must be a 4-D"),
    ("dropout-neg", "fwd", "dropout_p", lambda a: -0.1, "dropout_p must be in [0, 1]"),
    ("dropout-big", "fwd", "dropout_p", lambda a: 1.5, "dropout_p must be in [0, 1]"),
    ("o-dtype", "fwd", "o", lambda a: a["o"].double(), "o must be Float"),
    ("o-shape", "fwd", "o", lambda a: a["o"][..., :5], "o must have shape"),
    ("o-stride", "fwd", "o", lambda a: _strided(a["o"]), "unit-stride last dim"),
    ("o-overlap", "fwd", "o", lambda a: torch.empty(2, 4, 1, 6).expand(2, 4, 5, 6), "overlapping"),
    ("o-is-v", "fwd", "o", lambda a: a["v"][:, :, :5].repeat_interleave(2, 1), None),  # valid: a copy
    ("o-aliases-q", "fwd", "o", lambda a: a["q"].view(-1)[:240].view(2, 4, 5, 6), "single memory location"),
    ("o-meta", "fwd", "o", lambda a: a["o"].to("meta"), ""),
    ("lse-dtype", "fwd", "lse", lambda a: a["lse"].double(), "lse must be Float"),
    ("lse-shape", "fwd", "lse", lambda a: a["lse"][:, :, :4], "lse must have shape"),
    ("lse-strided", "fwd", "lse", lambda a: torch.empty(2, 4, 10)[..., ::2], "lse must be contiguous"),
    ("dout-shape", "bwd", "dout", lambda b: b["dout"][..., :5], "dout must have shape"),
    ("dout-dtype", "bwd", "dout", lambda b: b["dout"].double(), "dout must be Float"),
    ("dout-stride", "bwd", "dout", lambda b: _strided(b["dout"]), "unit-stride last dim"),
    ("bwd-o-shape", "bwd", "o", lambda b: b["o"][:, :2], "o must have shape"),
    ("bwd-lse-dtype", "bwd", "lse", lambda b: b["lse"].double(), "lse must be Float"),
    ("bwd-lse-strided", "bwd", "lse", lambda b: torch.empty(2, 4, 10)[..., ::2], "lse must be contiguous"),
    ("bwd-mask-shape", "bwd", "mask", lambda b: torch.zeros(1, 4, 5, 7), "mask must have shape"),
    ("bwd-heads", "bwd", "q", lambda b: torch.randn(2, 3, 5, 8), "multiple of the kv heads"),
    ("bwd-dropout", "bwd", "dropout_p", lambda b: 2.0, "dropout_p must be in [0, 1]"),
    ("dq-shape", "bwd", "dq", lambda b: b["dq"][:, :, :4], "dq must have shape"),
    ("dq-dtype", "bwd", "dq", lambda b: b["dq"].half(), "dq must be Float"),
    ("dq-stride", "bwd", "dq", lambda b: _strided(b["dq"]), "unit-stride last dim"),
    ("dq-overlap", "bwd", "dq", lambda b: torch.empty(1, 4, 5, 8).expand(2, 4, 5, 8), "overlapping"),
    ("dq-aliases-q", "bwd", "dq", lambda b: b["q"], "single memory location"),
    ("dk-shape", "bwd", "dk", lambda b: b["dk"][:, :1], "dk must have shape"),
    ("dk-stride", "bwd", "dk", lambda b: _strided(b["dk"]), "unit-stride last dim"),
    ("dk-blhe", "bwd", "dk", lambda b: torch.empty(2, 7, 2, 8).transpose(1, 2), None),  # valid: strided
    ("dv-dtype", "bwd", "dv", lambda b: b["dv"].double(), "dv must be Float"),
    ("dv-shape", "bwd", "dv", lambda b: b["dv"][..., :3], "dv must have shape"),
    ("dv-meta", "bwd", "dv", lambda b: b["dv"].to("meta"), ""),
    ("dmask-shape", "bwd", "dmask", lambda b: torch.zeros(2, 4, 5, 6), "dmask must have shape"),
    ("dmask-dtype", "bwd", "dmask", lambda b: torch.zeros(2, 4, 5, 7, dtype=torch.float64), "dmask must be Float"),
    ("dmask-strided", "bwd", "dmask", lambda b: torch.zeros(2, 4, 7, 5).transpose(2, 3), "dmask must be contiguous"),
    ("dmask-meta", "bwd", "dmask", lambda b: torch.empty(0, device="meta"), ""),
]


@pytest.mark.parametrize("cid,op,arg,make,msg", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_raise(C, cid, op, arg, make, msg):
    a, b = _valid()
    args = a if op == "fwd" else b
    args[arg] = make(args)
    fn = C.attention_fwd if op == "fwd" else C.attention_bwd
    if msg is None:  # a control: this replacement is valid
        fn(*args.values())
        return
    with pytest.raises((RuntimeError, NotImplementedError), match=None if not msg else msg.replace("[", r"\[")):
        fn(*args.values())


def test_valid_arguments_run(C):
    """The baseline of the cases above is valid, in every dtype (masks: bool, fp32, q's dtype)."""
    for dt in DTYPES:
        a, b = _valid(dt)
        for m in (None, a["mask"] > 0, a["mask"], a["mask"].to(dt)):
            a["mask"] = b["mask"] = m
            a["lse"] = b["lse"] = torch.empty(2, 4, 5, dtype=_acc(dt))
            b["o"], b["dmask"] = a["o"], torch.zeros(2, 4, 5, 7, dtype=_acc(dt))
            C.attention_fwd(*a.values())
            C.attention_bwd(*b.values())
            assert torch.isfinite(b["dq"]).all() and torch.isfinite(b["dmask"]).all()

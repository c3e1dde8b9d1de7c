"""Triton kernels of the gradient statistics and the finishing program of an adaptive clipping step
(fusedstab/ops/grad_stats.py; the eager references are fusedstab.reference.grad_stats and
grad_clip_finish).

``stats``: one read of every gradient of a (device, dtype) group gives each tensor's sum of squares,
count of non-finite elements and max |x|: a program per chunk of the multi-tensor chunk table
(kernels/multi_tensor.py, cached on the device), then a program per tensor combines its chunks in a
fixed order (deterministic, no atomics).

``finish``: one program turns the per-tensor sums into the total norm, the mode's threshold (ZClip's
EMA, a running quantile), the clip coefficient and the skip flag, updates the state and writes the
telemetry ring slot: no host sync, nothing that depends on the values on the host, so a step can be
captured in a CUDA graph.
"""
import numpy as np
import torch
import triton
import triton.language as tl

from .multi_tensor import BLOCK, _TL, _chunk_ptr, table

FIXED, ZCLIP, QUANTILE = 0, 1, 2
MODES = {"fixed": FIXED, "zclip": ZCLIP, "quantile": QUANTILE}
_ZCLIP, _QUANTILE = tl.constexpr(ZCLIP), tl.constexpr(QUANTILE)  # a jit function reads only constexpr globals


@triton.jit
def _stats_step(sq, bad, nan, mx, a):
    """Fold |x| of one block into the running sums (padding lanes hold 0: finite, adding nothing)."""
    sq += a * a
    bad += (~(a < float("inf"))).to(tl.int32)  # NaN and Inf
    nan = tl.maximum(nan, (a != a).to(tl.int32))
    return sq, bad, nan, tl.maximum(mx, a)


@triton.jit
def _stats_chunks_kernel(ADDR, START, LEN, PARTIAL, NC, DTYPE: tl.constexpr, ACC_T: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """PARTIAL (3, NC): chunk c's sum x^2, non-finite count, max |x| (NaN if one was NaN). Whole blocks
    unmasked then a masked tail, as multi_tensor's norm kernel: 16-byte loads where aligned."""
    c = tl.program_id(0)
    ptr = _chunk_ptr(ADDR, START, c, DTYPE, ALIGNED)
    n = tl.load(LEN + c)
    sq = tl.zeros([BLOCK], ACC_T)
    bad = tl.zeros([BLOCK], tl.int32)
    mx = tl.zeros([BLOCK], ACC_T)
    nan = tl.zeros([BLOCK], tl.int32)
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for s in range(0, n_full, BLOCK):
        sq, bad, nan, mx = _stats_step(sq, bad, nan, mx, tl.abs(tl.load(ptr + (s + offs)).to(ACC_T)))
    o = n_full + offs  # the tail (possibly empty)
    sq, bad, nan, mx = _stats_step(sq, bad, nan, mx, tl.abs(tl.load(ptr + o, mask=o < n, other=0.0).to(ACC_T)))
    tl.store(PARTIAL + c, tl.sum(sq, axis=0))
    tl.store(PARTIAL + NC + c, tl.sum(bad, axis=0).to(ACC_T))
    tl.store(PARTIAL + 2 * NC + c, tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(mx, axis=0)))


@triton.jit
def _stats_per_tensor_kernel(PARTIAL, NC, OFFSETS, OUT, T, BLOCK: tl.constexpr):
    """OUT (3, T): tensor t's chunks [OFFSETS[t], OFFSETS[t+1]) combined in chunk order."""
    t = tl.program_id(0)
    lo = tl.load(OFFSETS + t)
    hi = tl.load(OFFSETS + t + 1)
    sq = tl.zeros([BLOCK], PARTIAL.dtype.element_ty)
    bad = tl.zeros([BLOCK], PARTIAL.dtype.element_ty)
    mx = tl.zeros([BLOCK], PARTIAL.dtype.element_ty)
    nan = tl.zeros([BLOCK], tl.int32)
    for s in range(lo, hi, BLOCK):
        o = s + tl.arange(0, BLOCK)
        m = o < hi
        sq += tl.load(PARTIAL + o, mask=m, other=0.0)
        bad += tl.load(PARTIAL + NC + o, mask=m, other=0.0)
        v = tl.load(PARTIAL + 2 * NC + o, mask=m, other=0.0)
        nan = tl.maximum(nan, (v != v).to(tl.int32))
        mx = tl.maximum(mx, v)
    tl.store(OUT + t, tl.sum(sq, axis=0))
    tl.store(OUT + T + t, tl.sum(bad, axis=0))
    tl.store(OUT + 2 * T + t, tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(mx, axis=0)))


def stats(tensors, out: torch.Tensor) -> None:
    """Per-tensor statistics (see fusedstab.reference.grad_stats) of a dense same-dtype list into
    ``out`` (3, len(tensors)), in its dtype (the accumulation dtype)."""
    tab = table(tensors)
    acc = out.dtype
    partial = torch.empty(3, tab.num_chunks, dtype=acc, device=out.device)
    _stats_chunks_kernel[(tab.num_chunks,)](
        tab.addr, tab.start, tab.length, partial, tab.num_chunks, DTYPE=_TL[tensors[0].dtype], ACC_T=_TL[acc],
        ALIGNED=tab.aligned, BLOCK=BLOCK, num_warps=8)
    _stats_per_tensor_kernel[(tab.num_tensors,)](partial, tab.num_chunks, tab.offsets, out, tab.num_tensors,
                                                 BLOCK=256, num_warps=4)


# ----------------------------------------------------------------------------- the finishing program
@triton.jit
def _f64(hi, lo):
    """A float64 argument, passed as two fp32 halves (Triton passes Python floats as fp32)."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _min(a, b):
    return tl.where(a < b, a, b)  # neither is NaN where it is used


@triton.jit
def _finish_kernel(STATS, T, STATE, MAXN, cap_hi, cap_lo, warmup, zt_hi, zt_lo, al_hi, al_lo, eps_hi, eps_lo,
                   q_hi, q_lo, sa_hi, sa_lo, RING_T, RING_S, K, G_OUT, COEF_OUT, FOUND_OUT, THR_OUT,
                   MODE: tl.constexpr, HAS_MAXN: tl.constexpr, SKIP_NONFINITE: tl.constexpr, RING: tl.constexpr,
                   W: tl.constexpr, WB: tl.constexpr, RB: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program. RING: 0 none, 1 the scalars ring, 2 also the per-tensor ring. W: the quantile
    window (WB: a power of two >= W; RB: window entries compared per step of the rank loop)."""
    steps = tl.load(STATE + 0)
    seen = tl.load(STATE + 1)
    mean = tl.load(STATE + 2)
    var = tl.load(STATE + 3)
    slot = 0
    if RING > 0:
        slot = steps.to(tl.int64) % K
    # the total norm (fp64 sum of the per-tensor sums), and the per-tensor ring row
    acc = tl.zeros([BLOCK_T], tl.float64)
    for s in range(0, T, BLOCK_T):
        o = s + tl.arange(0, BLOCK_T)
        m = o < T
        sq = tl.load(STATS + o, mask=m, other=0.0).to(tl.float64)
        acc += sq
        if RING == 2:
            row = RING_T + slot * 3 * T
            ty = RING_T.dtype.element_ty
            tl.store(row + o, tl.sqrt(sq).to(ty), mask=m)
            tl.store(row + T + o, tl.load(STATS + 2 * T + o, mask=m).to(ty), mask=m)  # max |x|
            tl.store(row + 2 * T + o, tl.load(STATS + T + o, mask=m).to(ty), mask=m)  # non-finite count
    g = tl.sqrt(tl.sum(acc, axis=0))

    if HAS_MAXN:
        cap = tl.load(MAXN).to(tl.float64)
    else:
        cap = _f64(cap_hi, cap_lo)
    finite = g < float("inf")  # g >= 0; false for NaN and Inf
    skip = g > _f64(sa_hi, sa_lo)
    if SKIP_NONFINITE:
        skip = skip | ~finite
    good = finite & ~skip
    warm = seen < warmup
    thr = cap
    if MODE == _ZCLIP:
        zt = _f64(zt_hi, zt_lo)
        al = _f64(al_hi, al_lo)
        std = tl.sqrt(tl.maximum(var, 0.0))
        z = (g - mean) / (std + _f64(eps_hi, eps_lo))
        spike = (~warm) & (z > zt)
        adaptive = mean + zt * zt * std / z
        thr = tl.where(spike, _min(adaptive, cap), cap)
        n1 = seen + 1
        w_mean = mean + (g - mean) / n1
        w_m2 = var + (g - mean) * (g - w_mean)
        w_var = tl.where(n1 >= warmup, w_m2 / n1, w_m2)
        x = tl.where(spike, adaptive, g)
        e_mean = al * mean + (1 - al) * x
        e_var = al * var + (1 - al) * (x - e_mean) * (x - e_mean)
        tl.store(STATE + 2, tl.where(good, tl.where(warm, w_mean, e_mean), mean))
        tl.store(STATE + 3, tl.where(good, tl.where(warm, w_var, e_var), var))
    if MODE == _QUANTILE:
        idx = tl.arange(0, WB)
        win = tl.load(STATE + 4 + idx, mask=idx < W, other=float("nan"))
        hit = (idx == seen.to(tl.int64) % W).to(tl.int32) * good.to(tl.int32)  # (the interpreter can't & these)
        win = tl.where(hit != 0, g, win)
        tl.store(STATE + 4 + idx, win, mask=idx < W)
        m = _min(tl.where(good, seen + 1, seen), W * 1.0)
        # the order statistics by rank (count of smaller values, ties by index): no sort network,
        # a (WB, RB) comparison per block of the window, read back after the store above
        tl.debug_barrier()
        vals = tl.where(win == win, win, float("inf"))  # empty slots (NaN) and padding rank last
        rank = tl.zeros([WB], tl.int32)
        for j0 in range(0, W, RB):
            jj = j0 + tl.arange(0, RB)
            xj = tl.load(STATE + 4 + jj, mask=jj < W, other=float("nan"))
            xj = tl.where(xj == xj, xj, float("inf"))
            less = (xj[None, :] < vals[:, None]) | ((xj[None, :] == vals[:, None]) & (jj[None, :] < idx[:, None]))
            rank += tl.sum(less.to(tl.int32), axis=1)
        p = _f64(q_hi, q_lo) * (m - 1)
        lo = tl.minimum(tl.maximum(p, 0.0).to(tl.int64), W - 1)  # floor (p >= 0 when m > 0)
        hi = tl.minimum(lo + 1, tl.maximum(m - 1, 0.0).to(tl.int64))
        v_lo = tl.sum(tl.where(rank == lo, vals, 0.0), axis=0)
        v_hi = tl.sum(tl.where(rank == hi, vals, 0.0), axis=0)
        quant = tl.where(m > 0, v_lo + (p - lo) * (v_hi - v_lo), float("inf"))
        thr = tl.where(warm, cap, _min(quant, cap))
    coef = thr / (g + 1e-6)
    coef = tl.where(coef > 1.0, 1.0, coef)  # clamp(max=1) keeping NaN, as torch
    coef = tl.where(skip, 1.0, coef)
    tl.store(STATE + 1, tl.where(good, seen + 1, seen))
    tl.store(STATE + 0, steps + 1)
    if RING > 0:
        ts = RING_S.dtype.element_ty
        tl.store(RING_S + slot * 5 + 0, (steps + 1).to(ts))
        tl.store(RING_S + slot * 5 + 1, g.to(ts))
        tl.store(RING_S + slot * 5 + 2, thr.to(ts))
        tl.store(RING_S + slot * 5 + 3, coef.to(ts))
        tl.store(RING_S + slot * 5 + 4, skip.to(ts))
    ty = G_OUT.dtype.element_ty
    tl.store(G_OUT, g.to(ty))
    tl.store(COEF_OUT, coef.to(ty))
    tl.store(FOUND_OUT, skip.to(tl.float32))
    tl.store(THR_OUT, thr.to(ty))


def _halves(x: float) -> tuple[float, float]:
    hi = float(np.float32(x))
    return (hi, x - hi) if np.isfinite(hi) else (hi, 0.0)


def finish(outs, stats, state, max_norm, max_norm_value, mode, warmup, z_thresh, alpha, eps, q, skip_nonfinite,
           skip_above, ring_tensors, ring_scalars) -> None:
    """See fusedstab.reference.grad_clip_finish; writes the four 0-d ``outs``."""
    g, coef, found, thr = outs
    T = stats.shape[1]
    K = ring_scalars.shape[0]
    W = state.numel() - 4 if mode == "quantile" else 0
    ring = 0 if K == 0 else 2 if ring_tensors.numel() else 1
    _finish_kernel[(1,)](
        stats, T, state, max_norm if max_norm is not None else state, *_halves(max_norm_value), warmup,
        *_halves(z_thresh), *_halves(alpha), *_halves(eps), *_halves(q), *_halves(skip_above),
        ring_tensors if ring == 2 else state, ring_scalars if ring else state, max(K, 1), g, coef, found, thr,
        MODE=MODES[mode], HAS_MAXN=max_norm is not None, SKIP_NONFINITE=skip_nonfinite, RING=ring, W=max(W, 1),
        WB=triton.next_power_of_2(max(W, 1)), RB=32, BLOCK_T=1024, num_warps=4)

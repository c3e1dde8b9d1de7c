"""Triton FlashAttention (forward and FlashAttention-2 backward) for scaled dot-product attention.

o = dropout(softmax(scale * q k^T + mask)) v, per (batch, query head); q (B, Hq, L, E), k (B, Hkv, S, E),
v (B, Hkv, S, Ev), any strides, grouped-query attention (query head h reads kv head h // (Hq // Hkv)),
E and Ev any sizes up to 256 (the head-dim blocks are padded to a power of two and masked).

Masking: ``mask`` is a bool (True = takes part) or an additive float tensor, read tile by tile through
its 4 strides (an expanded (B, Hq, L, S) view: stride 0 on broadcast dims, nothing materialized);
``causal`` is torch's top-left alignment (query i sees key j iff j <= i), and may be combined with a
mask. Tiles wholly above the diagonal (j > i throughout) are never visited: the forward and dq loops
over key blocks stop early, the dk/dv loop over query blocks starts late; only the tiles that straddle
the diagonal or a sequence end pay for the causal and tail masks.

Forward: online softmax in the base-2 domain (exp2, with scale * log2(e) folded into the scores and
log2(e) applied to an additive mask), fp32 accumulation, o = acc / l. Saved per row: lse = logsumexp
of the scaled, masked scores in the NATURAL log, fp32 (B, Hq, L) contiguous. Fully masked rows
(every key masked out, or S == 0): o = 0 and lse = -inf; the backward reads lse = -inf as "no
probabilities" (p = 0), so such a row gets dq = 0, adds nothing to dk/dv (or dmask), and no NaN
appears anywhere.

Dropout (on the probabilities, kept ones scaled by 1 / (1 - p); p == 1 gives zeros): element (b, h, i,
j) is kept iff word j % 4 of Philox4x32-10(key = seed, counter = (j // 4, i, b * Hq + h, offset)),
shifted right by 8, is >= round(p * 2^24) (``_keep_tile``): one Philox call per four keys, all its
arithmetic 32-bit, and the backward regenerates exactly the forward's mask whatever the block sizes.
Calls with different ``offset`` (mod 2^32) or ``seed`` get independent masks. lse is that of the
probabilities before dropout.

Short query lengths (decoding: fewer (batch, head, query block) programs than SMs): the forward splits
each program's keys over up to 128 programs (split-KV, flash-decoding) whose normalized partial o and
lse (fp32) one more kernel merges. GQA / MQA backward: the dk/dv kernel's loop over the query heads of
a kv head is split over programs when its grid (key blocks x B x Hkv) is smaller than the GPU, and the
fp32 partials are summed in a fixed order.

Backward (FlashAttention-2): delta = rowsum(do * o) (fp32); a kernel over query blocks computes dq
and, on request, the gradient of an additive mask dS = P * (dP - delta) as a full fp32 (B, Hq, L, S)
tensor (zero where skipped); a kernel over key blocks computes dk, dv, looping over the query blocks
of every query head of its kv head's group (GQA sums in registers: deterministic, no atomics).

Numerics of 2-byte inputs: by default FlashAttention's: P and dS are rounded to the input dtype for
their tensor-core products and delta comes from the rounded o. Those roundings (torch's CUDA flash
kernel has them too) put dq, dk up to ~4x the error of an fp32 computation rounded once (torch's
math path, which upcasts) on random inputs. ``precise=True`` removes them: P and dS enter their
products as high + low halves in the input dtype (two MMAs each, ~22 significant bits), and the dq
kernel first computes delta = rowsum(P * dP) in fp32 (a second pass over the keys, written for the
dk/dv kernel, which then runs after it): results within ~1x of the math path's error, for about 1.5x
the forward's and 1.7x the backward's tensor-core work. fp32 runs "ieee" dots (tf32 with
``allow_tf32``); fp64 (fp64 accumulation and lse) runs where the interpreter runs (CPU), for
gradcheck: on CUDA it raises NotImplementedError, for the caller's fallback.
"""
import os

import torch
import triton
import triton.language as tl

from .common import gpu_of

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2
# Block sizes under the interpreter: (BLOCK_M, BLOCK_N) of every kernel. Small, to keep CPU runs fast
# and to cross block boundaries with small shapes; tests override it to check unequal blocks.
INTERPRET_BLOCKS = (16, 16)


# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _masked_scores(s, i2, j2, MASK, smm, smn, L, S, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                   BOUNDARY: tl.constexpr):
    """Apply the user mask, causality and the key tail to scores ``s`` (base-2 domain). ``i2``/``j2``
    are int64 query/key index tiles broadcastable to s's shape (either orientation); ``MASK`` points
    at this (batch, head)'s mask. Masked-out scores become -inf."""
    if MASK_KIND == 2:
        mv = tl.load(MASK + i2 * smm + j2 * smn, mask=(i2 < L) & (j2 < S), other=0.0)
        s = s + mv.to(s.dtype) * 1.4426950408889634
    elif MASK_KIND == 1:
        mv = tl.load(MASK + i2 * smm + j2 * smn, mask=(i2 < L) & (j2 < S), other=0)
        s = tl.where(mv != 0, s, float("-inf"))
    if BOUNDARY:
        valid = j2 < S
        if CAUSAL:
            valid = valid & (j2 <= i2)
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _keep_tile(seed, offset, bh, rows, n0, drop_thresh, BLOCK_N: tl.constexpr):
    """The dropout keep mask of query rows ``rows`` (i) and keys n0 .. n0 + BLOCK_N (j), as a
    (len(rows), BLOCK_N) tile. Philox4x32-10 keyed by the 64-bit seed, on the counter (j // 4, i,
    b * Hq + h, offset) of four 32-bit words, gives four 32-bit outputs: one per key of the quad
    (output j % 4), so a call serves four elements and no index arithmetic is 64-bit. Kept iff
    output >> 8 >= drop_thresh = round(p * 2^24). n0 is a multiple of 4 and the counter names the
    element, so the forward and both backward kernels regenerate the same mask whatever their blocks."""
    quad = n0 // 4 + tl.arange(0, BLOCK_N // 4)
    i = rows.to(tl.int32)
    c0 = quad[None, :] + 0 * i[:, None]
    c1 = i[:, None] + 0 * quad[None, :]
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, (bh + 0 * i[:, None]).to(tl.int32), (offset + 0 * i[:, None]).to(tl.int32))
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_N))  # key 4q + k: output k
    return (r >> 8).to(tl.int32, bitcast=True) >= drop_thresh


@triton.jit
def _pid_split(pid, n_blocks, REVERSE: tl.constexpr):
    """(block, batch*head) of a flat program id: consecutive programs share a head (its K/V stay in
    L2); the heaviest (last) causal blocks are scheduled first."""
    blk = pid % n_blocks
    if REVERSE:
        blk = n_blocks - 1 - blk
    return blk, pid // n_blocks


@triton.jit
def _query_block(Q, pid, sqb, sqh, sqm, sqe, Hq, L, E, GROUPS, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """This program's block of queries (forward and dq kernels): (b, h, its kv head, b * Hq + h, first
    row, rows, rows as int64, row mask, the q tile)."""
    pid_m, bh = _pid_split(pid, tl.cdiv(L, BLOCK_M), CAUSAL)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    m64 = offs_m.to(tl.int64)
    rmask = offs_m < L
    q = tl.load(Q + b * sqb + h * sqh + m64[:, None] * sqm + offs_e[None, :] * sqe,
                mask=rmask[:, None] & (offs_e < E)[None, :], other=0.0)
    return b, h, h // GROUPS, bh.to(tl.int64), m0, offs_m, m64, rmask, q


@triton.jit
def _key_range(m0, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, hi) for queries [m0, m0 + BLOCK_M): key blocks [0, full_end) need no causal or tail
    mask, [full_end, hi) do, keys >= hi are never seen."""
    if CAUSAL:
        return (tl.minimum(m0 + 1, S) // BLOCK_N) * BLOCK_N, tl.minimum(S, m0 + BLOCK_M)
    else:
        return (S // BLOCK_N) * BLOCK_N, S


@triton.jit
def _pdot(a, b, acc, SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b for an fp32 tile ``a`` (P or dS) and a tile ``b`` in the input dtype: ``a`` rounded to
    b's dtype for the tensor cores (FlashAttention's numerics), or with SPLIT (precise mode, 2-byte
    inputs) as the sum of two products with a's high and low halves (~22 significant bits)."""
    a_hi = a.to(b.dtype)
    acc = tl.dot(a_hi, b, acc, input_precision=INPUT_PRECISION)
    if SPLIT:
        acc = tl.dot((a - a_hi.to(a.dtype)).to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
    return acc


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_step(acc, l_i, m_i, q, K_bh, V_bh, MASK, offs_m, n0, bh, L, S, E, EV,
              skn, ske, svn, sve, smm, smn, qk_scale, drop_thresh, drop_scale, seed, offset,
              CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDARY: tl.constexpr,
              DROPOUT: tl.constexpr, SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              ACC_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    n64 = offs_n.to(tl.int64)
    kmask = (offs_e < E)[:, None]
    vmask = (offs_ev < EV)[None, :]
    if BOUNDARY:
        kmask = kmask & (offs_n < S)[None, :]
        vmask = vmask & (offs_n < S)[:, None]
    kT = tl.load(K_bh + offs_e[:, None] * ske + n64[None, :] * skn, mask=kmask, other=0.0)
    v = tl.load(V_bh + n64[:, None] * svn + offs_ev[None, :] * sve, mask=vmask, other=0.0)
    s = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_T) * qk_scale
    i2 = offs_m.to(tl.int64)[:, None]
    j2 = n64[None, :]
    s = _masked_scores(s, i2, j2, MASK, smm, smn, L, S, CAUSAL, MASK_KIND, BOUNDARY)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: exp2(-inf) = 0
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_keep_tile(seed, offset, bh, offs_m, n0, drop_thresh, BLOCK_N), p * drop_scale, 0.0)
    acc = _pdot(p, v, acc * alpha[:, None], SPLIT, INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seed", "offset"])
def _attn_fwd_kernel(Q, K, V, MASK, O, LSE,
                     sqb, sqh, sqm, sqe, skb, skh, skn, ske, svb, svh, svn, sve,
                     smb, smh, smm, smn, sob, soh, som, soe, so_split, slse_split, KV_SPLIT,
                     Hq, L, S, E, EV, GROUPS, qk_scale, drop_thresh, drop_scale, seed, offset,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                     SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_T: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    # Split-KV (flash-decoding, KV_SPLIT > 1): program (query block, split) attends to key blocks
    # split, split + KV_SPLIT, ... only (the online softmax takes them in any order) and writes its
    # own normalized o and lse to fp32 partials (so_split, slse_split apart), which
    # _split_kv_combine_kernel merges.
    pid = tl.program_id(0)
    split = pid % KV_SPLIT
    b, h, hk, bh, m0, offs_m, m64, rmask, q = _query_block(Q, pid // KV_SPLIT, sqb, sqh, sqm, sqe, Hq, L, E,
                                                           GROUPS, CAUSAL, BLOCK_M, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    K_bh = K + b * skb + hk * skh
    V_bh = V + b * svb + hk * svh
    MASK_bh = MASK  # a None pointer stays None: a jit function cannot return it (triton 3.6)
    if MASK_KIND != 0:
        MASK_bh = MASK + b * smb + h * smh

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_T)
    l_i = tl.zeros([BLOCK_M], ACC_T)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], ACC_T)
    full_end, hi = _key_range(m0, S, CAUSAL, BLOCK_M, BLOCK_N)
    # key blocks split, split + KV_SPLIT, ... (all of them when KV_SPLIT == 1): first those below
    # full_end (no causal or tail mask), then this split's first block at or past full_end onwards
    step = KV_SPLIT * BLOCK_N
    for n0 in range(split * BLOCK_N, full_end, step):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_bh, V_bh,
                                  MASK_bh, offs_m, n0, bh, L, S, E, EV, skn, ske, svn, sve, smm, smn,
                                  qk_scale, drop_thresh, drop_scale, seed, offset, CAUSAL, MASK_KIND, False,
                                  DROPOUT, SPLIT, INPUT_PRECISION, ACC_T, BLOCK_N, BLOCK_E, BLOCK_EV)
    fb = full_end // BLOCK_N
    for n0 in range((fb + (split - fb % KV_SPLIT + KV_SPLIT) % KV_SPLIT) * BLOCK_N, hi, step):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_bh, V_bh,
                                  MASK_bh, offs_m, n0, bh, L, S, E, EV, skn, ske, svn, sve, smm, smn,
                                  qk_scale, drop_thresh, drop_scale, seed, offset, CAUSAL, MASK_KIND, True,
                                  DROPOUT, SPLIT, INPUT_PRECISION, ACC_T, BLOCK_N, BLOCK_E, BLOCK_EV)
    empty = l_i == 0.0  # fully masked row: o = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    split64 = split.to(tl.int64)
    tl.store(O + split64 * so_split + b * sob + h * soh + m64[:, None] * som + offs_ev[None, :] * soe,
             o.to(O.dtype.element_ty), mask=rmask[:, None] & (offs_ev < EV)[None, :])
    tl.store(LSE + split64 * slse_split + bh * L + m64, lse, mask=rmask)


@triton.jit
def _split_kv_combine_kernel(OP, LSEP, O, LSE, BHL, Hq, L, EV, KV_SPLIT, sob, soh, som, soe,
                             BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr, SPLIT_P2: tl.constexpr):
    """o and lse of BLOCK_M (batch, head, query) rows from the KV_SPLIT partials of the split-KV
    forward (OP (KV_SPLIT, BHL, EV) fp32 normalized, LSEP (KV_SPLIT, BHL) natural log):
    lse = log(sum_k exp(lse_k)), o = sum_k exp(lse_k - lse) o_k, in split order; -inf and 0 where
    every split saw no key."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < BHL
    k = tl.arange(0, SPLIT_P2)
    lse_k = tl.load(LSEP + k.to(tl.int64)[:, None] * BHL + rows[None, :],
                    mask=(k < KV_SPLIT)[:, None] & rmask[None, :], other=float("-inf"))
    m = tl.max(lse_k, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp(lse_k - m[None, :]), axis=0)
    offs_ev = tl.arange(0, BLOCK_EV)
    emask = rmask[:, None] & (offs_ev < EV)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_EV], OP.dtype.element_ty)
    for s in range(0, KV_SPLIT):
        s64 = tl.cast(s, tl.int64)
        w = tl.exp(tl.load(LSEP + s64 * BHL + rows, mask=rmask, other=float("-inf")) - m)
        o_s = tl.load(OP + (s64 * BHL + rows)[:, None] * EV + offs_ev[None, :], mask=emask, other=0.0)
        acc += w[:, None] * o_s
    empty = den == 0.0
    o = acc / tl.where(empty, 1.0, den)[:, None]
    b = rows // (Hq * L)
    h = (rows // L) % Hq
    i = rows % L
    tl.store(O + b[:, None] * sob + h[:, None] * soh + i[:, None] * som + offs_ev[None, :] * soe,
             o.to(O.dtype.element_ty), mask=emask)
    tl.store(LSE + rows, tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, den))), mask=rmask)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sob, soh, som, soe, sdb, sdh, sdm, sde, Hq, L, EV,
                           ACC_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr):
    pid_m, bh = _pid_split(tl.program_id(0), tl.cdiv(L, BLOCK_M), False)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    m64 = offs_m.to(tl.int64)
    mask = (offs_m < L)[:, None] & (offs_ev < EV)[None, :]
    o = tl.load(O + b * sob + h * soh + m64[:, None] * som + offs_ev[None, :] * soe, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + m64[:, None] * sdm + offs_ev[None, :] * sde, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC_T) * do.to(ACC_T), 1)
    tl.store(DELTA + bh.to(tl.int64) * L + m64, delta.to(DELTA.dtype.element_ty), mask=offs_m < L)


@triton.jit
def _lse2(LSE_bh, offs_m, L):
    """Base-2 lse of rows; +inf for fully masked rows and rows past L, so that exp2(s - lse2) = 0."""
    lse = tl.load(LSE_bh + offs_m, mask=offs_m < L, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, MASK, n0, offs_n, m0, bh, L, S, E, EV,
               sqm, sqe, sdm, sde, smm, smn, qk_scale, drop_thresh, drop_scale, seed, offset,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDARY: tl.constexpr,
               DROPOUT: tl.constexpr, SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               ACC_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_EV: tl.constexpr):
    # Transposed orientation: tiles are (keys, queries).
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    m64 = offs_m.to(tl.int64)
    rows = (offs_m < L)
    qT = tl.load(Q_bh + offs_e[:, None] * sqe + m64[None, :] * sqm,
                 mask=(offs_e < E)[:, None] & rows[None, :], other=0.0)
    do = tl.load(DO_bh + m64[:, None] * sdm + offs_ev[None, :] * sde,
                 mask=rows[:, None] & (offs_ev < EV)[None, :], other=0.0)
    lse2 = _lse2(LSE_bh, offs_m, L)
    delta = tl.load(DELTA_bh + offs_m, mask=rows, other=0.0).to(ACC_T)
    sT = tl.dot(k, qT, input_precision=INPUT_PRECISION, out_dtype=ACC_T) * qk_scale
    i2 = m64[None, :]
    j2 = offs_n.to(tl.int64)[:, None]
    sT = _masked_scores(sT, i2, j2, MASK, smm, smn, L, S, CAUSAL, MASK_KIND, BOUNDARY)
    # Query rows past L (zero-filled) are summed over here: zero their P and dS outright, as q = 0
    # against a key holding an inf gives NaN scores that lse2 = +inf cannot cancel.
    valid = i2 < L
    pT = tl.where(valid, tl.exp2(sT - lse2[None, :]), 0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_T)
    if DROPOUT:
        keep = tl.trans(_keep_tile(seed, offset, bh, offs_m, n0, drop_thresh, BLOCK_N))
        pdT = tl.where(keep, pT * drop_scale, 0.0)
        dpT = tl.where(keep, dpT * drop_scale, 0.0)
    else:
        pdT = pT
    dv = _pdot(pdT, do, dv, SPLIT, INPUT_PRECISION)
    dsT = tl.where(valid, pT * (dpT - delta[None, :]), 0.0)
    dk = _pdot(dsT, tl.trans(qT), dk, SPLIT, INPUT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "offset"])
def _attn_bwd_dkdv_kernel(Q, K, V, MASK, DO, LSE, DELTA, DK, DV,
                          sqb, sqh, sqm, sqe, skb, skh, skn, ske, svb, svh, svn, sve,
                          smb, smh, smm, smn, sdb, sdh, sdm, sde,
                          sdkb, sdkh, sdkn, sdke, sdvb, sdvh, sdvn, sdve, sdk_split, sdv_split,
                          Hq, Hkv, L, S, E, EV, GROUPS, GSPLIT, qk_scale, sm_scale, drop_thresh, drop_scale, seed,
                          offset,
                          CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                          SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_T: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    # Program (key block, query-head split gs, b * Hkv + kv head): split gs takes query heads gs,
    # gs + GSPLIT, ... of the kv head's group and writes its own (GSPLIT, ...) fp32 partial of dk, dv
    # (summed afterwards in a fixed order), so that MQA / GQA at batch 1 still fills the GPU.
    pid_n, rest = _pid_split(tl.program_id(0), tl.cdiv(S, BLOCK_N), False)
    gs = rest % GSPLIT
    bhk = rest // GSPLIT
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    n64 = offs_n.to(tl.int64)
    cols = offs_n < S
    k = tl.load(K + b * skb + hk * skh + n64[:, None] * skn + offs_e[None, :] * ske,
                mask=cols[:, None] & (offs_e < E)[None, :], other=0.0)
    v = tl.load(V + b * svb + hk * svh + n64[:, None] * svn + offs_ev[None, :] * sve,
                mask=cols[:, None] & (offs_ev < EV)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], ACC_T)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], ACC_T)
    # Query blocks [m_start, full_start) straddle the diagonal (causal masks); [full_start, L) see
    # the whole key block. Non-causal: all of [0, L) without masks (keys past S only touch dk/dv rows
    # that are never stored).
    if CAUSAL:
        m_start = (n0 // BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, tl.cdiv(L, BLOCK_M) * BLOCK_M)
    else:
        m_start = 0
        full_start = 0
    for g in range(gs, GROUPS, GSPLIT):
        h = hk * GROUPS + g
        bh = b * Hq + h
        Q_bh = Q + b * sqb + h * sqh
        DO_bh = DO + b * sdb + h * sdh
        LSE_bh = LSE + bh * L
        DELTA_bh = DELTA + bh * L
        MASK_bh = MASK
        if MASK_KIND != 0:
            MASK_bh = MASK + b * smb + h * smh
        for m0 in range(m_start, full_start, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q_bh, DO_bh,
                                LSE_bh, DELTA_bh, MASK_bh, n0, offs_n, m0, bh, L, S, E, EV, sqm, sqe, sdm, sde,
                                smm, smn, qk_scale, drop_thresh, drop_scale, seed, offset, CAUSAL, MASK_KIND,
                                True, DROPOUT, SPLIT, INPUT_PRECISION, ACC_T, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV)
        for m0 in range(full_start, L, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q_bh, DO_bh,
                                LSE_bh, DELTA_bh, MASK_bh, n0, offs_n, m0, bh, L, S, E, EV, sqm, sqe, sdm, sde,
                                smm, smn, qk_scale, drop_thresh, drop_scale, seed, offset, CAUSAL, MASK_KIND,
                                False, DROPOUT, SPLIT, INPUT_PRECISION, ACC_T, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV)
    dk = dk * sm_scale
    gs64 = gs.to(tl.int64)
    tl.store(DK + gs64 * sdk_split + b * sdkb + hk * sdkh + n64[:, None] * sdkn + offs_e[None, :] * sdke,
             dk.to(DK.dtype.element_ty), mask=cols[:, None] & (offs_e < E)[None, :])
    tl.store(DV + gs64 * sdv_split + b * sdvb + hk * sdvh + n64[:, None] * sdvn + offs_ev[None, :] * sdve,
             dv.to(DV.dtype.element_ty), mask=cols[:, None] & (offs_ev < EV)[None, :])


@triton.jit
def _dq_step(dq, dsum, q, do, lse2, delta, K_bh, V_bh, MASK, DMASK_bh, offs_m, n0, bh, L, S, E, EV,
             skn, ske, svn, sve, smm, smn, qk_scale, drop_thresh, drop_scale, seed, offset,
             CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDARY: tl.constexpr,
             DROPOUT: tl.constexpr, STORE_DMASK: tl.constexpr, DELTA_PASS: tl.constexpr, SPLIT: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, ACC_T: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    """One key block of the dq loop; with DELTA_PASS instead adds rowsum(P * dP) (= delta, exactly) to dsum."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    n64 = offs_n.to(tl.int64)
    kmask = (offs_e < E)[:, None]
    vmask = (offs_ev < EV)[:, None]
    if BOUNDARY:
        kmask = kmask & (offs_n < S)[None, :]
        vmask = vmask & (offs_n < S)[None, :]
    kT = tl.load(K_bh + offs_e[:, None] * ske + n64[None, :] * skn, mask=kmask, other=0.0)
    vT = tl.load(V_bh + offs_ev[:, None] * sve + n64[None, :] * svn, mask=vmask, other=0.0)
    s = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=ACC_T) * qk_scale
    i2 = offs_m.to(tl.int64)[:, None]
    j2 = n64[None, :]
    s = _masked_scores(s, i2, j2, MASK, smm, smn, L, S, CAUSAL, MASK_KIND, BOUNDARY)
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=INPUT_PRECISION, out_dtype=ACC_T)
    if DROPOUT:
        dp = tl.where(_keep_tile(seed, offset, bh, offs_m, n0, drop_thresh, BLOCK_N), dp * drop_scale, 0.0)
    if DELTA_PASS:
        dsum += tl.sum(p * dp, 1)
    else:
        ds = p * (dp - delta[:, None])
        if STORE_DMASK:
            tl.store(DMASK_bh + i2 * S + j2, ds.to(DMASK_bh.dtype.element_ty), mask=(i2 < L) & (j2 < S))
        dq = _pdot(ds, tl.trans(kT), dq, SPLIT, INPUT_PRECISION)
    return dq, dsum


@triton.jit(do_not_specialize=["seed", "offset"])
def _attn_bwd_dq_kernel(Q, K, V, MASK, DO, LSE, DELTA, DQ, DMASK,
                        sqb, sqh, sqm, sqe, skb, skh, skn, ske, svb, svh, svn, sve,
                        smb, smh, smm, smn, sdb, sdh, sdm, sde, sdqb, sdqh, sdqm, sdqe,
                        Hq, L, S, E, EV, GROUPS, qk_scale, sm_scale, drop_thresh, drop_scale, seed, offset,
                        CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                        STORE_DMASK: tl.constexpr, EXACT_DELTA: tl.constexpr, SPLIT: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, ACC_T: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    b, h, hk, bh, m0, offs_m, m64, rmask, q = _query_block(Q, tl.program_id(0), sqb, sqh, sqm, sqe, Hq, L, E,
                                                           GROUPS, CAUSAL, BLOCK_M, BLOCK_E)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    do = tl.load(DO + b * sdb + h * sdh + m64[:, None] * sdm + offs_ev[None, :] * sde,
                 mask=rmask[:, None] & (offs_ev < EV)[None, :], other=0.0)
    lse2 = _lse2(LSE + bh * L, offs_m, L)
    K_bh = K + b * skb + hk * skh
    V_bh = V + b * svb + hk * svh
    MASK_bh = MASK  # a None pointer stays None: a jit function cannot return it (triton 3.6)
    if MASK_KIND != 0:
        MASK_bh = MASK + b * smb + h * smh
    DMASK_bh = DMASK
    if STORE_DMASK:
        DMASK_bh = DMASK + bh * L * S
    full_end, hi = _key_range(m0, S, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_E], ACC_T)
    delta = tl.zeros([BLOCK_M], ACC_T)
    if EXACT_DELTA:
        # Precise mode: delta = rowsum(P * dP) from fp32 P and dP (a first pass over the keys) rather
        # than rowsum(do * o) from the rounded o; stored for the dk/dv kernel, which runs after this one.
        for n0 in range(0, full_end, BLOCK_N):
            dq, delta = _dq_step(dq, delta, q, do, lse2, delta, K_bh, V_bh, MASK_bh, DMASK_bh, offs_m, n0, bh,
                                 L, S, E, EV, skn, ske, svn, sve, smm, smn, qk_scale, drop_thresh, drop_scale,
                                 seed, offset, CAUSAL, MASK_KIND, False, DROPOUT, False, True, SPLIT,
                                 INPUT_PRECISION, ACC_T, BLOCK_N, BLOCK_E, BLOCK_EV)
        for n0 in range(full_end, hi, BLOCK_N):
            dq, delta = _dq_step(dq, delta, q, do, lse2, delta, K_bh, V_bh, MASK_bh, DMASK_bh, offs_m, n0, bh,
                                 L, S, E, EV, skn, ske, svn, sve, smm, smn, qk_scale, drop_thresh, drop_scale,
                                 seed, offset, CAUSAL, MASK_KIND, True, DROPOUT, False, True, SPLIT,
                                 INPUT_PRECISION, ACC_T, BLOCK_N, BLOCK_E, BLOCK_EV)
        tl.store(DELTA + bh * L + offs_m, delta.to(DELTA.dtype.element_ty), mask=rmask)
        # lse2 loaded again: triton 3.6's layout clean-up otherwise reuses a conversion of lse2 made in
        # the loops above and fails ("operand does not dominate this use") at 128 x 32, 4 warps.
        lse2 = _lse2(LSE + bh * L, offs_m, L)
    else:
        delta = tl.load(DELTA + bh * L + offs_m, mask=rmask, other=0.0).to(ACC_T)
    for n0 in range(0, full_end, BLOCK_N):
        dq, delta = _dq_step(dq, delta, q, do, lse2, delta, K_bh, V_bh, MASK_bh, DMASK_bh, offs_m, n0, bh,
                             L, S, E, EV, skn, ske, svn, sve, smm, smn, qk_scale, drop_thresh, drop_scale,
                             seed, offset, CAUSAL, MASK_KIND, False, DROPOUT, STORE_DMASK, False, SPLIT,
                             INPUT_PRECISION, ACC_T, BLOCK_N, BLOCK_E, BLOCK_EV)
    for n0 in range(full_end, hi, BLOCK_N):
        dq, delta = _dq_step(dq, delta, q, do, lse2, delta, K_bh, V_bh, MASK_bh, DMASK_bh, offs_m, n0, bh,
                             L, S, E, EV, skn, ske, svn, sve, smm, smn, qk_scale, drop_thresh, drop_scale,
                             seed, offset, CAUSAL, MASK_KIND, True, DROPOUT, STORE_DMASK, False, SPLIT,
                             INPUT_PRECISION, ACC_T, BLOCK_N, BLOCK_E, BLOCK_EV)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + m64[:, None] * sdqm + offs_e[None, :] * sdqe, dq.to(DQ.dtype.element_ty),
             mask=rmask[:, None] & (offs_e < E)[None, :])


# ----------------------------------------------------------------------------- launch configuration
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim (max of E and Ev), for 2-byte inputs
# on GPUs with >= 164 KB of shared memory per SM (A100: 164 KB, H100: 228 KB). Untuned on a GPU yet.
# - fwd: the FlashAttention-2 Triton choice, 128 x 64 at E <= 128 (q tile resident, K/V tiles
#   pipelined in 3 stages: 16 + 3 * 2 * 8 KB at E = 64, 32 + 3 * 2 * 16 KB at E = 128); E = 256
#   halves both (the fp32 accumulator 64 x 256 alone is 64 registers a thread at 8 warps).
# - dkdv: a key block of 128 (k, v, and the fp32 dk, dv accumulators live in registers) against
#   query blocks streamed past it (the Triton tutorial's 32 x 128), with 8 warps: k, v, dk, dv take
#   192 registers a thread at E = 64 and 4 warps, which spills; 16 queries at E = 128 and 32 keys at
#   E = 256 for the same reason.
# - dq: the mirror, 128 queries against streamed key blocks of 32.
# Checked by compiling for sm_90 (triton 3.9, ptxas): no spills without dropout; with dropout and a
# mask a few hundred bytes at most.
_BIG_SMEM = {  # head dim <=: (fwd, dkdv, dq)
    64: ((128, 64, 4, 3), (32, 128, 8, 3), (128, 32, 4, 3)),
    128: ((128, 64, 8, 3), (16, 128, 8, 2), (128, 32, 8, 2)),
    256: ((64, 32, 8, 2), (16, 32, 8, 2), (64, 16, 8, 2)),
}
# Consumer / older GPUs (~100 KB of shared memory or less): half the tiles, 2 stages.
_SMALL_SMEM = {
    64: ((64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)),
    128: ((64, 32, 4, 2), (16, 64, 8, 2), (64, 16, 8, 2)),
    256: ((32, 32, 4, 1), (16, 32, 8, 1), (32, 16, 8, 1)),
}
_KERNEL = {"fwd": 0, "dkdv": 1, "dq": 2}


def _config(kind: str, head_block: int, dtype: torch.dtype, device: torch.device, L: int, S: int,
            dropout: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel: the table row; 32 x 32 tiles for fp32
    (larger ones spill); 8 warps under dropout (Philox's state on a 128 x 64 tile spills at 4); blocks
    no longer than the sequences."""
    gpu = gpu_of(device)
    if gpu is None:  # the interpreter
        bm, bn = INTERPRET_BLOCKS
        return bm, bn, 4, 1
    major, minor = gpu.capability
    table = _BIG_SMEM if (major, minor) in ((8, 0), (9, 0), (10, 0)) else _SMALL_SMEM
    row = table[64 if head_block <= 64 else 128 if head_block <= 128 else 256]
    bm, bn, warps, stages = row[_KERNEL[kind]]
    if dtype.itemsize >= 4:  # fp32 "ieee" dots run on FMA units with both operands in registers
        bm, bn = (16 if kind == "dkdv" and head_block > 128 else 32), 32
        stages = max(1, stages - 1)
    if dropout:
        warps = max(warps, 8)
    # Short sequences: no block longer than needed (powers of two keep the number of variants small).
    bm = min(bm, max(16, triton.next_power_of_2(max(L, 1))))
    bn = min(bn, max(16, triton.next_power_of_2(max(S, 1))))
    return bm, bn, warps, stages


# ----------------------------------------------------------------------------- launchers
def _input_precision(dtype: torch.dtype, allow_tf32: bool):
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return None


def _check(q, k, v, mask, dropout_p):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, L, E); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _ACC:
        raise NotImplementedError(f"attention: the triton kernels take fp16, bf16, fp32 (fp64 on CPU); got {q.dtype}")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        # untested there (fp64 exp2/log2 lower to libdevice calls); the torch fallback serves fp64
        raise NotImplementedError("attention: the triton kernels take fp64 only under the interpreter (CPU)")
    if not (q.device == k.device == v.device):
        raise ValueError("attention: q, k, v must be on one device")
    B, Hq, L, E = q.shape
    Bk, Hkv, S, Ek = k.shape
    if Bk != B or v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != S or Ek != E:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not fit (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    Ev = v.shape[3]
    if max(E, Ev) > MAX_HEAD_DIM:
        raise NotImplementedError(f"attention: the triton kernels take head dims up to {MAX_HEAD_DIM}; "
                                  f"got E={E}, Ev={Ev}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1]; got {dropout_p}")
    kind = _MASK_NONE
    if mask is not None:
        if mask.device != q.device:
            raise ValueError("attention: mask must be on q's device")
        if mask.dtype == torch.bool:
            kind = _MASK_BOOL
        elif mask.dtype.is_floating_point:
            kind = _MASK_ADD
        else:
            raise ValueError(f"attention: mask must be bool or floating point; got {mask.dtype}")
        try:
            mask = mask.expand(B, Hq, L, S)
        except RuntimeError as e:
            raise ValueError(f"attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"{(B, Hq, L, S)}") from e
        if kind == _MASK_BOOL:
            mask = mask.view(torch.uint8)  # same strides, a plain byte pointer in the kernel
    return B, Hq, Hkv, L, S, E, Ev, mask, kind


def _mask_args(mask):
    return tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)


def _drop_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)  # p == 1: nothing kept, o = 0


def _drop_thresh(dropout_p: float) -> int:
    """An element is kept iff its 24 random bits are >= this: round(p * 2^24) (2^24 at p = 1: none)."""
    return int(round(float(dropout_p) * (1 << 24)))


def _kv_splits(programs: int, S: int, block_n: int, device) -> int:
    """Key-range splits of the forward (split-KV, flash-decoding): where the query blocks alone leave
    SMs idle (a few query rows: decoding), each (batch, head, query block) is split over key ranges of
    at least two blocks, to about two programs per SM. 1 under the interpreter (no SMs to fill)."""
    gpu = gpu_of(device)
    if gpu is None or programs >= gpu.sm_count:
        return 1
    return max(1, min(triton.cdiv(S, block_n) // 2, triton.cdiv(2 * gpu.sm_count, programs), 128))


def _group_splits(programs: int, groups: int, device) -> int:
    """Splits of the dk/dv kernel's loop over a kv head's query heads (GQA / MQA): the dk/dv grid is
    Hq / Hkv times smaller than the query side's (MQA at batch 1, 2K keys: 16 programs); split to about
    two programs per SM."""
    gpu = gpu_of(device)
    if gpu is None or groups == 1 or programs >= gpu.sm_count:
        return 1
    return max(1, min(groups, triton.cdiv(2 * gpu.sm_count, programs)))


def _like_layout(ref: torch.Tensor, shape, dtype) -> torch.Tensor:
    """An empty (B, H, L, D) tensor whose (B, H, L) dims are laid out in ref's order (e.g. q taken as
    a (B, L, H, E).transpose(1, 2) view gives o in (B, L, H, Ev) memory), head dim contiguous."""
    order = sorted(range(3), key=lambda d: -ref.stride(d))
    t = torch.empty([shape[d] for d in order] + [shape[3]], dtype=dtype, device=ref.device)
    inv = [order.index(d) for d in range(3)] + [3]
    return t.permute(*inv)


def _split(dtype: torch.dtype, precise: bool) -> bool:
    return bool(precise) and dtype.itemsize == 2  # fp32/fp64 products are never rounded


def attention_fwd(q, k, v, mask=None, *, causal=False, scale, dropout_p=0.0, seed=0, offset=0,
                  allow_tf32=False, precise=False, out=None):
    """o (B, Hq, L, Ev) in q's dtype (laid out like q's (B, Hq, L) dims) and lse (B, Hq, L):
    natural-log logsumexp of the scaled, masked scores, fp32 (fp64 for fp64 input), -inf (with o = 0)
    on fully masked rows. See the module header for masks, causality, dropout and ``precise``.
    ``out``: (o, lse) to write into (o with any strides, lse contiguous)."""
    B, Hq, Hkv, L, S, E, Ev, mask, mask_kind = _check(q, k, v, mask, dropout_p)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o, lse = out if out is not None else (_like_layout(q, (B, Hq, L, Ev), q.dtype),
                                          torch.empty((B, Hq, L), dtype=acc_dtype, device=q.device))
    if B * Hq * L == 0:
        return o, lse
    if S == 0:  # no keys: every row fully masked
        return o.zero_(), lse.fill_(float("-inf"))
    be, bev = _head_block(E), _head_block(Ev)
    bm, bn, warps, stages = _config("fwd", max(be, bev), q.dtype, q.device, L, S, dropout_p > 0.0)
    programs = triton.cdiv(L, bm) * B * Hq
    splits = _kv_splits(programs, S, bn, q.device)
    if splits == 1:
        out, out_lse, out_strides, split_strides = o, lse, o.stride(), (0, 0)
    else:  # fp32 partials, merged below
        BHL = B * Hq * L
        out = torch.empty((splits, BHL, Ev), dtype=acc_dtype, device=q.device)
        out_lse = torch.empty((splits, BHL), dtype=acc_dtype, device=q.device)
        out_strides, split_strides = (Hq * L * Ev, L * Ev, Ev, 1), (BHL * Ev, BHL)
    _attn_fwd_kernel[(programs * splits,)](
        q, k, v, mask, out, out_lse, *q.stride(), *k.stride(), *v.stride(), *_mask_args(mask), *out_strides,
        *split_strides, splits, Hq, L, S, E, Ev, Hq // Hkv, float(scale) * LOG2E, _drop_thresh(dropout_p),
        _drop_scale(dropout_p), int(seed), int(offset),
        CAUSAL=bool(causal), MASK_KIND=mask_kind, DROPOUT=dropout_p > 0.0, SPLIT=_split(q.dtype, precise),
        INPUT_PRECISION=_input_precision(q.dtype, allow_tf32), ACC_T=_ACC[q.dtype],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be, BLOCK_EV=bev, num_warps=warps, num_stages=stages)
    if splits > 1:
        rows = 16 if _interpret() else 32
        _split_kv_combine_kernel[(triton.cdiv(BHL, rows),)](
            out, out_lse, o, lse, BHL, Hq, L, Ev, splits, *o.stride(), BLOCK_M=rows, BLOCK_EV=bev,
            SPLIT_P2=triton.next_power_of_2(splits), num_warps=4)
    return o, lse


def attention_bwd(do, q, k, v, o, lse, mask=None, *, causal=False, scale, dropout_p=0.0, seed=0, offset=0,
                  mask_needs_grad=False, allow_tf32=False, precise=False, out=None):
    """(dq, dk, dv, dmask): input gradients in the inputs' dtype and layout (empty_like), and, when
    ``mask_needs_grad`` (an additive float mask), dS = P * (dP - delta) as a full fp32 (B, Hq, L, S)
    tensor (zero where causality skips or everything is masked) that the caller reduces over the
    mask's broadcast dims; otherwise None. Same mask, causal, scale, dropout_p, seed and offset as
    the forward that produced o and lse (``o`` is read only when not ``precise``). ``out``: (dq, dk, dv,
    dmask) to write into, dmask zero-filled (or None)."""
    B, Hq, Hkv, L, S, E, Ev, mask, mask_kind = _check(q, k, v, mask, dropout_p)
    if mask_needs_grad and mask_kind != _MASK_ADD:
        raise ValueError("attention: mask_needs_grad needs an additive float mask")
    if tuple(do.shape) != (B, Hq, L, Ev) or tuple(o.shape) != (B, Hq, L, Ev) or tuple(lse.shape) != (B, Hq, L):
        raise ValueError(f"attention: do {tuple(do.shape)}, o {tuple(o.shape)}, lse {tuple(lse.shape)} do not "
                         f"fit q {tuple(q.shape)} and v {tuple(v.shape)}")
    lse = lse.contiguous()
    if out is not None:
        dq, dk, dv, dmask = out
    else:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dmask = torch.zeros((B, Hq, L, S), dtype=torch.float32, device=q.device) if mask_needs_grad else None
    if B * Hq * L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    acc = _ACC[q.dtype]
    be, bev = _head_block(E), _head_block(Ev)
    split = _split(q.dtype, precise)
    flags = dict(CAUSAL=bool(causal), MASK_KIND=mask_kind, DROPOUT=dropout_p > 0.0, SPLIT=split,
                 INPUT_PRECISION=_input_precision(q.dtype, allow_tf32), ACC_T=acc, BLOCK_E=be, BLOCK_EV=bev)
    scalars = (float(scale) * LOG2E, float(scale), _drop_thresh(dropout_p), _drop_scale(dropout_p), int(seed),
               int(offset))
    common = (*q.stride(), *k.stride(), *v.stride(), *_mask_args(mask), *do.stride())

    delta = torch.empty((B, Hq, L), dtype=lse.dtype, device=q.device)
    if not split:  # precise mode: the dq kernel computes delta itself, and runs first
        pre_m = 16 if _interpret() else max(16, min(64, 4096 // bev))  # ~32 elements of o and do a thread
        _bwd_preprocess_kernel[(triton.cdiv(L, pre_m) * B * Hq,)](
            o, do, delta, *o.stride(), *do.stride(), Hq, L, Ev, ACC_T=acc, BLOCK_M=pre_m, BLOCK_EV=bev)

    bm, bn, warps, stages = _config("dq", max(be, bev), q.dtype, q.device, L, S, dropout_p > 0.0)
    _attn_bwd_dq_kernel[(triton.cdiv(L, bm) * B * Hq,)](
        q, k, v, mask, do, lse, delta, dq, dmask, *common, *dq.stride(),
        Hq, L, S, E, Ev, Hq // Hkv, *scalars, **flags, STORE_DMASK=mask_needs_grad, EXACT_DELTA=split,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    bm, bn, warps, stages = _config("dkdv", max(be, bev), q.dtype, q.device, L, S, dropout_p > 0.0)
    programs = triton.cdiv(S, bn) * B * Hkv
    gsplit = _group_splits(programs, Hq // Hkv, q.device)
    if gsplit == 1:
        dk_out, dv_out, dk_strides, dv_strides = dk, dv, (*dk.stride(), 0), (*dv.stride(), 0)
    else:  # each split's partial dk, dv in the accumulation dtype, summed below in a fixed order
        dk_out = torch.empty((gsplit, B, Hkv, S, E), dtype=lse.dtype, device=q.device)
        dv_out = torch.empty((gsplit, B, Hkv, S, Ev), dtype=lse.dtype, device=q.device)
        dk_strides = (*dk_out.stride()[1:], dk_out.stride(0))
        dv_strides = (*dv_out.stride()[1:], dv_out.stride(0))
    _attn_bwd_dkdv_kernel[(programs * gsplit,)](
        q, k, v, mask, do, lse, delta, dk_out, dv_out, *common, *dk_strides[:4], *dv_strides[:4],
        dk_strides[4], dv_strides[4], Hq, Hkv, L, S, E, Ev, Hq // Hkv, gsplit, *scalars, **flags,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    if gsplit > 1:
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))
    return dq, dk, dv, dmask

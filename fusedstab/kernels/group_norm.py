"""Triton GroupNorm kernels (forward and backward, optional fused activation) and their launchers.

x is seen as (N, C, S) with any strides (NCHW: (C*S, S, 1); channels_last: (S*C, 1, C)), read in
place. Group (n, g) is the (C/G, S) block of channels g*C/G.. of sample n, cut into n_ct x n_st tiles
(BLOCK_C channels x BLOCK_S positions). Each group's reduction is split over SPLIT programs (grid
(N*G, SPLIT)); program ``split`` takes tiles t = split, split + SPLIT, ... of the group's n_ct * n_st
(tile t is channel tile t // n_st, spatial tile t % n_st), so that batch 1 with 32 groups fills the
GPU whether the group's tiles run along the channels (few positions: 1x2048x16x16) or the positions.

Forward: pass 1 writes per-program (count, mean, M2) of its tiles (Chan's parallel combine on values
centred by a pivot); the host side combines them in float64 in a fixed order (deterministic)
into mean and rstd; pass 2 normalizes, applies weight and bias,
then the activation. Backward: pass 1 writes per-group partials of sum(gw), sum(gw * xhat) and
per-channel partials of dweight, dbias (gw = dz * w, dz = dy * act'(z), z recomputed from x);
pass 2 writes dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)).

Rows (S == 1: (N, C) input, or (N, C, 1, 1)): group (n, g) is C/G consecutive channels of one row, so
one program holds BLOCK_N whole rows as a (BLOCK_N, BLOCK_G, BLOCK_K) tile (samples, groups, channels
of a group): statistics, normalization and activation in one read (``rows_fwd``); backward keeps
each program's dweight / dbias partials in registers over its samples (``rows_bwd``).
"""
import torch
import triton
import triton.language as tl

from .common import _ACC, ACTIVATIONS, _acc, _act, _act_grad, _rsqrt, _slope, split_slope, target_programs

TILE = 2048
ROWS_MAX = 8192  # rows kernels: the widest padded row (next_pow2(G) * next_pow2(C/G) elements)
ROWS_TILE = 4096  # rows kernels: elements per tile


@triton.jit
def _tile(n, g, ct, st, Cg, S, sn, sc, ss, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (int64), channel indices and mask of tile (ct, st) of group (n, g)."""
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    s = st * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = g.to(tl.int64) * Cg + c  # int64: a program index times a size
    offs = n.to(tl.int64) * sn + ch[:, None] * sc + s.to(tl.int64)[None, :] * ss
    return offs, ch, (c < Cg)[:, None] & (s < S)[None, :]


@triton.jit
def _fwd_stats_kernel(X, PART, G, Cg, S, sn, sc, ss, n_ct, n_st, ACC_T: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """PART (4, SPLIT, N*G): this program's (count, pivot, mean - pivot, sum of squared deviations),
    its tiles combined as Chan et al. do on values centred by the pivot (the mean of its first tile:
    fp32 means of data offset far from 0 are off by an ulp of the offset, which Chan's update would
    multiply into M2)."""
    ng, split, SPLIT = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n, g = ng // G, ng % G
    offs, ch, mask = _tile(n, g, split // n_st, split % n_st, Cg, S, sn, sc, ss, BLOCK_C, BLOCK_S)
    pivot = tl.sum(tl.sum(tl.load(X + offs, mask=mask, other=0.0).to(ACC_T), axis=1), axis=0) / \
        tl.maximum(tl.sum(tl.sum(mask.to(ACC_T), axis=1), axis=0), 1.0)
    cnt = tl.zeros([1], dtype=ACC_T)
    mean = tl.zeros([1], dtype=ACC_T)
    m2 = tl.zeros([1], dtype=ACC_T)
    for t in range(split, n_ct * n_st, SPLIT):
        offs, ch, mask = _tile(n, g, t // n_st, t % n_st, Cg, S, sn, sc, ss, BLOCK_C, BLOCK_S)
        v = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(ACC_T) - pivot, 0.0)
        c = tl.sum(tl.sum(mask.to(ACC_T), axis=1), axis=0)
        tile_mean = tl.sum(tl.sum(v, axis=1), axis=0) / c
        d = tl.where(mask, v - tile_mean, 0.0)
        tot = cnt + c
        delta = tile_mean - mean
        frac = c / tot
        mean += delta * frac
        m2 += tl.sum(tl.sum(d * d, axis=1), axis=0) + delta * delta * cnt * frac
        cnt = tot
    NG = tl.num_programs(0).to(tl.int64)
    out = PART + split.to(tl.int64) * NG + ng + tl.arange(0, 1)
    tl.store(out, cnt)
    tl.store(out + SPLIT * NG, pivot + tl.zeros([1], ACC_T))
    tl.store(out + 2 * SPLIT * NG, mean)
    tl.store(out + 3 * SPLIT * NG, m2)


@triton.jit
def _fwd_norm_kernel(X, W, B, Y, MEAN, RSTD, G, Cg, S, sn, sc, ss, yn, yc, ys, n_ct, n_st,
                     slope_a, slope_b, slope_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     ACT: tl.constexpr, ACC_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    ng, split, SPLIT = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n, g = ng // G, ng % G
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    for t in range(split, n_ct * n_st, SPLIT):
        ct, st = t // n_st, t % n_st
        offs, ch, mask = _tile(n, g, ct, st, Cg, S, sn, sc, ss, BLOCK_C, BLOCK_S)
        z = (tl.load(X + offs, mask=mask, other=0.0).to(ACC_T) - mean) * rstd
        cmask = ch < (g + 1) * Cg
        if HAS_W:
            z = z * tl.load(W + ch, mask=cmask, other=0.0).to(ACC_T)[:, None]
        if HAS_B:
            z = z + tl.load(B + ch, mask=cmask, other=0.0).to(ACC_T)[:, None]
        y_offs, _, _ = _tile(n, g, ct, st, Cg, S, yn, yc, ys, BLOCK_C, BLOCK_S)
        tl.store(Y + y_offs, _act(z, ACT, slope).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_load(DY, X, W, B, offs, dy_offs, ch, mask, cmask, mean, rstd, slope,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr):
    """(xhat, dz, gw) of one tile: dz = dy * act'(z), gw = dz * w; zero where masked."""
    xhat = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(ACC_T) - mean) * rstd, 0.0)
    dy = tl.load(DY + dy_offs, mask=mask, other=0.0).to(ACC_T)
    if HAS_W:
        w = tl.load(W + ch, mask=cmask, other=0.0).to(ACC_T)[:, None]
    else:
        w = 1.0
    if ACT != 0:
        z = xhat * w
        if HAS_B:
            z = z + tl.load(B + ch, mask=cmask, other=0.0).to(ACC_T)[:, None]
        dy = _act_grad(dy, z, ACT, slope)
    return xhat, dy, dy * w


@triton.jit
def _bwd_reduce_kernel(DY, X, W, B, MEAN, RSTD, GPART, CPART, G, C, Cg, S, sn, sc, ss, dn, dc, ds,
                       n_ct, n_st, slope_a, slope_b, slope_c,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """GPART (N*G, SPLIT, 2): sum(gw), sum(gw * xhat); CPART (N, SPLIT, 2, C): per channel sum(dz * xhat)
    (dweight) and sum(dz) (dbias) over this program's spatial tiles."""
    ng, split, SPLIT = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n, g = ng // G, ng % G
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    a = tl.zeros((BLOCK_C, BLOCK_S), ACC_T)
    b = tl.zeros((BLOCK_C, BLOCK_S), ACC_T)
    cpart = CPART + (n.to(tl.int64) * SPLIT + split) * 2 * C
    for ct in range(0, n_ct):
        dw = tl.zeros((BLOCK_C, BLOCK_S), ACC_T)
        db = tl.zeros((BLOCK_C, BLOCK_S), ACC_T)
        # this program's tiles of channel tile ct: t = ct * n_st + st = split (mod SPLIT); none (and
        # zeros stored) when SPLIT > n_st and ct is another program's
        st0 = (split - (ct * n_st) % SPLIT + SPLIT) % SPLIT
        for st in range(st0, n_st, SPLIT):
            offs, ch, mask = _tile(n, g, ct, st, Cg, S, sn, sc, ss, BLOCK_C, BLOCK_S)
            dy_offs, _, _ = _tile(n, g, ct, st, Cg, S, dn, dc, ds, BLOCK_C, BLOCK_S)
            xhat, dz, gw = _bwd_load(DY, X, W, B, offs, dy_offs, ch, mask, ch < (g + 1) * Cg, mean, rstd,
                                     slope, HAS_W, HAS_B, ACT, ACC_T)
            a += gw
            b += gw * xhat
            dw += dz * xhat
            db += dz
        c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        ch = g.to(tl.int64) * Cg + c
        tl.store(cpart + ch, tl.sum(dw, axis=1), mask=c < Cg)
        tl.store(cpart + C + ch, tl.sum(db, axis=1), mask=c < Cg)
    out = GPART + (ng.to(tl.int64) * SPLIT + split) * 2
    tl.store(out, tl.sum(tl.sum(a, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(b, axis=1), axis=0))


@triton.jit
def _bwd_dx_kernel(DY, X, W, B, DX, MEAN, RSTD, SUMS, G, Cg, S, sn, sc, ss, dn, dc, ds, xn, xc, xs,
                   n_ct, n_st, count, slope_a, slope_b, slope_c,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    ng, split, SPLIT = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n, g = ng // G, ng % G
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    mean_gw = tl.load(SUMS + ng * 2) / count
    mean_gwx = tl.load(SUMS + ng * 2 + 1) / count
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    for t in range(split, n_ct * n_st, SPLIT):
        ct, st = t // n_st, t % n_st
        offs, ch, mask = _tile(n, g, ct, st, Cg, S, sn, sc, ss, BLOCK_C, BLOCK_S)
        dy_offs, _, _ = _tile(n, g, ct, st, Cg, S, dn, dc, ds, BLOCK_C, BLOCK_S)
        xhat, dz, gw = _bwd_load(DY, X, W, B, offs, dy_offs, ch, mask, ch < (g + 1) * Cg, mean, rstd,
                                 slope, HAS_W, HAS_B, ACT, ACC_T)
        dx = rstd * (gw - mean_gw - xhat * mean_gwx)
        dx_offs, _, _ = _tile(n, g, ct, st, Cg, S, xn, xc, xs, BLOCK_C, BLOCK_S)
        tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- rows (S == 1)
@triton.jit
def _rows_tile(X, n, sxn, sxc, N, G, Cg, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets (int64) of samples ``n`` (BLOCK_N,) as (BLOCK_N, BLOCK_G, BLOCK_K), the channel index
    (BLOCK_G, BLOCK_K) and the mask."""
    g = tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_K)
    ch = g[:, None] * Cg + k[None, :]  # < C: no program index in it
    cmask = (g < G)[:, None] & (k < Cg)[None, :]
    offs = n.to(tl.int64)[:, None, None] * sxn + ch.to(tl.int64)[None, :, :] * sxc
    return offs, ch, cmask, (n < N)[:, None, None] & cmask[None, :, :]


@triton.jit
def _rows_params(W, B, ch, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC_T: tl.constexpr):
    w = 1.0
    b = 0.0
    if HAS_W:
        w = tl.load(W + ch, mask=cmask, other=0.0).to(ACC_T)[None, :, :]
    if HAS_B:
        b = tl.load(B + ch, mask=cmask, other=0.0).to(ACC_T)[None, :, :]
    return w, b


@triton.jit
def _rows_fwd_kernel(X, W, B, Y, MEAN, RSTD, N, G, Cg, sxn, sxc, syn, syc, eps, slope_a, slope_b, slope_c,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_N whole rows: mean and rstd per (sample, group) (N, G), y = act(xhat * w + b); one read."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs, ch, cmask, mask = _rows_tile(X, n, sxn, sxc, N, G, Cg, BLOCK_G, BLOCK_K)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_T)
    mean = tl.sum(x, axis=2) / Cg
    d = tl.where(mask, x - mean[:, :, None], 0.0)  # two passes over registers: exact at any offset
    rstd = _rsqrt(tl.sum(d * d, axis=2) / Cg + eps, ACC_T)
    stats = n.to(tl.int64)[:, None] * G + tl.arange(0, BLOCK_G)[None, :]
    smask = (n < N)[:, None] & (tl.arange(0, BLOCK_G) < G)[None, :]
    tl.store(MEAN + stats, mean, mask=smask)
    tl.store(RSTD + stats, rstd, mask=smask)
    w, b = _rows_params(W, B, ch, cmask, HAS_W, HAS_B, ACC_T)
    z = d * rstd[:, :, None] * w + b
    y_offs = n.to(tl.int64)[:, None, None] * syn + ch.to(tl.int64)[None, :, :] * syc
    tl.store(Y + y_offs, _act(z, ACT, _slope(slope_a, slope_b, slope_c, ACC_T)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rows_bwd_kernel(DY, X, W, B, MEAN, RSTD, DX, DW_PART, DB_PART, N, G, Cg, C, sxn, sxc, sdn, sdc, sqn, sqc,
                     slope_a, slope_b, slope_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """Persistent over blocks of BLOCK_N samples: dx per row; this program's dweight / dbias partials
    summed over its samples in registers, one (C,) row of DW_PART / DB_PART (P, C) at the end."""
    pid = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    offs0, ch, cmask, mask0 = _rows_tile(X, tl.arange(0, BLOCK_N), sxn, sxc, N, G, Cg, BLOCK_G, BLOCK_K)
    w, b = _rows_params(W, B, ch, cmask, HAS_W, HAS_B, ACC_T)
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    dw = tl.zeros((BLOCK_G, BLOCK_K), ACC_T)
    db = tl.zeros((BLOCK_G, BLOCK_K), ACC_T)
    for blk in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        offs, ch_n, cmask_n, mask = _rows_tile(X, n, sxn, sxc, N, G, Cg, BLOCK_G, BLOCK_K)
        stats = n.to(tl.int64)[:, None] * G + g[None, :]
        smask = (n < N)[:, None] & (g < G)[None, :]
        mean = tl.load(MEAN + stats, mask=smask, other=0.0)[:, :, None]
        rstd = tl.load(RSTD + stats, mask=smask, other=0.0)[:, :, None]
        xhat = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(ACC_T) - mean) * rstd, 0.0)
        dy_offs = n.to(tl.int64)[:, None, None] * sdn + ch.to(tl.int64)[None, :, :] * sdc
        dz = tl.load(DY + dy_offs, mask=mask, other=0.0).to(ACC_T)
        if ACT != 0:
            dz = _act_grad(dz, xhat * w + b, ACT, slope)
        gw = dz * w
        mean_gw = tl.sum(gw, axis=2) / Cg
        mean_gwx = tl.sum(gw * xhat, axis=2) / Cg
        dx = rstd * (gw - mean_gw[:, :, None] - xhat * mean_gwx[:, :, None])
        dx_offs = n.to(tl.int64)[:, None, None] * sqn + ch.to(tl.int64)[None, :, :] * sqc
        tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += tl.sum(dz * xhat, axis=0)
        if HAS_DB:
            db += tl.sum(dz, axis=0)  # masked lanes loaded dy = 0
    part = pid.to(tl.int64) * C + ch
    if HAS_DW:
        tl.store(DW_PART + part, dw, mask=cmask)
    if HAS_DB:
        tl.store(DB_PART + part, db, mask=cmask)


# ----------------------------------------------------------------------------- launchers
def _blocks(Cg: int, S: int, channels_inner: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): contiguous along S for NCHW, along the group's channels for channels_last."""
    if channels_inner:
        bc = max(2, min(triton.next_power_of_2(Cg), 128))
        return bc, max(2, min(triton.next_power_of_2(S), TILE // bc))
    bs = max(2, min(triton.next_power_of_2(S), 1024))
    return max(2, min(triton.next_power_of_2(Cg), TILE // bs)), bs


def _plan(x, G):
    N, C, S = x.shape
    Cg = C // G
    BLOCK_C, BLOCK_S = _blocks(Cg, S, x.stride(1) == 1 and x.stride(2) != 1)
    n_ct, n_st = triton.cdiv(Cg, BLOCK_C), triton.cdiv(S, BLOCK_S)
    split = max(1, min(n_ct * n_st, triton.cdiv(target_programs(x.device, 8), N * G)))
    return dict(Cg=Cg, S=S, n_ct=n_ct, n_st=n_st, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S), (N * G, split)


def fwd_stats(x, G):
    """Per-program (count, pivot, mean - pivot, M2): (4, SPLIT, N*G)."""
    p, grid = _plan(x, G)
    acc = _acc(x.dtype)
    part = x.new_empty((4, grid[1], grid[0]), dtype=acc)
    _fwd_stats_kernel[grid](x, part, G, p["Cg"], p["S"], *x.stride(), p["n_ct"], p["n_st"], ACC_T=_ACC[acc],
                            BLOCK_C=p["BLOCK_C"], BLOCK_S=p["BLOCK_S"], num_warps=4)
    return part


def fwd_norm(x, w, b, y, mean, rstd, G, act, slope):
    p, grid = _plan(x, G)
    _fwd_norm_kernel[grid](x, w, b, y, mean, rstd, G, p["Cg"], p["S"], *x.stride(), *y.stride(),
                           p["n_ct"], p["n_st"], *split_slope(slope), HAS_W=w is not None, HAS_B=b is not None,
                           ACT=ACTIVATIONS[act], ACC_T=_ACC[mean.dtype], BLOCK_C=p["BLOCK_C"],
                           BLOCK_S=p["BLOCK_S"], num_warps=4)


def bwd_reduce(dy, x, w, b, mean, rstd, G, act, slope):
    """(GPART (N*G, SPLIT, 2), CPART (N, SPLIT, 2, C)): see _bwd_reduce_kernel."""
    p, grid = _plan(x, G)
    N, C, _ = x.shape
    gpart = x.new_empty((grid[0], grid[1], 2), dtype=mean.dtype)
    cpart = x.new_empty((N, grid[1], 2, C), dtype=mean.dtype)  # every entry written
    _bwd_reduce_kernel[grid](dy, x, w, b, mean, rstd, gpart, cpart, G, C, p["Cg"], p["S"], *x.stride(),
                             *dy.stride(), p["n_ct"], p["n_st"], *split_slope(slope),
                             HAS_W=w is not None, HAS_B=b is not None, ACT=ACTIVATIONS[act],
                             ACC_T=_ACC[mean.dtype], BLOCK_C=p["BLOCK_C"], BLOCK_S=p["BLOCK_S"], num_warps=4)
    return gpart, cpart


def bwd_dx(dy, x, w, b, dx, mean, rstd, sums, G, act, slope):
    p, grid = _plan(x, G)
    _bwd_dx_kernel[grid](dy, x, w, b, dx, mean, rstd, sums, G, p["Cg"], p["S"], *x.stride(), *dy.stride(),
                         *dx.stride(), p["n_ct"], p["n_st"], p["Cg"] * p["S"], *split_slope(slope),
                         HAS_W=w is not None, HAS_B=b is not None, ACT=ACTIVATIONS[act],
                         ACC_T=_ACC[mean.dtype], BLOCK_C=p["BLOCK_C"], BLOCK_S=p["BLOCK_S"], num_warps=4)


def _rows_blocks(C: int, G: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_G, BLOCK_K, num_warps) of the rows kernels: tiles of ROWS_TILE elements (whole
    padded rows), 16 elements a thread at most."""
    bg, bk = triton.next_power_of_2(G), triton.next_power_of_2(C // G)
    bn = max(1, ROWS_TILE // (bg * bk))
    return bn, bg, bk, max(1, min(16, bn * bg * bk // 512))


def rows_ok(C: int, G: int) -> bool:
    """Whether (N, C) input with G groups takes the rows kernels (a padded row fits one tile)."""
    return triton.next_power_of_2(G) * triton.next_power_of_2(C // G) <= ROWS_MAX


def rows_fwd(x, w, b, y, mean, rstd, G, eps, act, slope):
    """x, y (N, C) with any strides; mean, rstd (N, G) contiguous: all written here."""
    N, C = x.shape
    bn, bg, bk, warps = _rows_blocks(C, G)
    _rows_fwd_kernel[(triton.cdiv(N, bn),)](
        x, w, b, y, mean, rstd, N, G, C // G, *x.stride(), *y.stride(), eps, *split_slope(slope),
        HAS_W=w is not None, HAS_B=b is not None, ACT=ACTIVATIONS[act], ACC_T=_ACC[mean.dtype],
        BLOCK_N=bn, BLOCK_G=bg, BLOCK_K=bk, num_warps=warps)


def rows_bwd(dy, x, w, b, mean, rstd, dx, dw, db, G, act, slope):
    """dy, x, dx (N, C) with any strides; mean, rstd (N, G) contiguous; dw, db (C,) in the accumulation
    dtype or None: written here (per-program partials summed in a fixed order)."""
    N, C = x.shape
    bn, bg, bk, warps = _rows_blocks(C, G)
    grid = max(1, min(triton.cdiv(N, bn), target_programs(x.device, 2)))
    dw_part = x.new_empty((grid, C), dtype=mean.dtype) if dw is not None else None
    db_part = x.new_empty((grid, C), dtype=mean.dtype) if db is not None else None
    _rows_bwd_kernel[(grid,)](
        dy, x, w, b, mean, rstd, dx, dw_part, db_part, N, G, C // G, C, *x.stride(), *dy.stride(), *dx.stride(),
        *split_slope(slope), HAS_W=w is not None, HAS_B=b is not None, HAS_DW=dw is not None,
        HAS_DB=db is not None, ACT=ACTIVATIONS[act], ACC_T=_ACC[mean.dtype],
        BLOCK_N=bn, BLOCK_G=bg, BLOCK_K=bk, num_warps=warps)
    if dw is not None:
        torch.sum(dw_part, 0, out=dw)
    if db is not None:
        torch.sum(db_part, 0, out=db)

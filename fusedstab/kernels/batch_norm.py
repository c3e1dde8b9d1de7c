"""Triton BatchNorm kernels (training statistics, normalize + activation, backward) and launchers.

x is (N, C, S), dense in one of two layouts (fusedstab.autograd makes it so); dy, y and dx share it:
- NCHW (CL False), strides (C*S, S, 1): program (c, split) owns channel c, and its tiles are
  BLOCK_I samples x BLOCK_J positions, contiguous along the positions;
- channels-last (CL True; also (N, C) input), strides (S*C, 1, C): rows of C channels at R = N*S
  positions; program (cb, split) owns BLOCK_J channels, and its tiles are BLOCK_I positions x
  BLOCK_J channels, contiguous along the channels.
Each channel's reduction is split over SPLIT programs (tile t goes to program t % SPLIT), so that
few channels or a small batch still fill the GPU. Grid (NB * n_cols, SPLIT): with per-sample
statistics (GroupNorm on channels-last input) program_id(0) = sample * n_cols + column, folded into
axis 0 (CUDA allows 2^31 - 1 programs there, 65535 on axes 1 and 2: a batch axis would cap N).

Statistics: each program combines its tiles' (count, mean, M2) as Chan et al. do, on values centred
by a pivot (its first tile's mean), and writes them per channel; the host combines the programs in
float64 in a fixed order. Backward: one pass writes per-program sum(dz) and sum(dz * xhat) per channel (dbias and
dweight), dz = dy * act'(z) with z = w * xhat + b recomputed from x; a second pass writes
dx = w * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)) (without the means in eval mode).
"""
import triton
import triton.language as tl

from .common import _ACC, ACTIVATIONS, _act, _act_grad, _slope, block_width, split_slope, target_programs

TILE = 2048  # elements per tile


@triton.jit
def _tile(t, pc, I, J, row_stride, n_tj, CL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """int64 offsets and mask of tile t of program column pc (a channel block, or a channel)."""
    if CL:
        i = t * BLOCK_I + tl.arange(0, BLOCK_I)
        j = pc * BLOCK_J + tl.arange(0, BLOCK_J)
        offs = i.to(tl.int64)[:, None] * row_stride + j[None, :]
    else:
        i = (t // n_tj) * BLOCK_I + tl.arange(0, BLOCK_I)
        j = (t % n_tj) * BLOCK_J + tl.arange(0, BLOCK_J)
        offs = pc.to(tl.int64) * J + i.to(tl.int64)[:, None] * row_stride + j[None, :]
    return offs, (i < I)[:, None] & (j < J)[None, :]


@triton.jit
def _csum(v, CL: tl.constexpr):
    """Per-channel sum of a tile: a (BLOCK_J,) vector (CL), else a scalar."""
    if CL:
        return tl.sum(v, axis=0)
    else:
        return tl.sum(tl.sum(v, axis=1), axis=0)


@triton.jit
def _tile_bc(v, CL: tl.constexpr):
    """A per-channel value shaped to broadcast over a tile."""
    if CL:
        return v[None, :]
    else:
        return v


@triton.jit
def _cload(P, pc, C, CL: tl.constexpr, BLOCK_J: tl.constexpr):
    """The program's per-channel values of P (C,): a (BLOCK_J,) vector (CL), else a scalar."""
    if CL:
        ch = pc * BLOCK_J + tl.arange(0, BLOCK_J)
        return tl.load(P + ch, mask=ch < C, other=0.0)
    else:
        return tl.load(P + pc)


@triton.jit
def _cstore(P, pc, v, C, CL: tl.constexpr, BLOCK_J: tl.constexpr):
    if CL:
        ch = pc * BLOCK_J + tl.arange(0, BLOCK_J)
        tl.store(P + ch, v, mask=ch < C)
    else:
        tl.store(P + pc + tl.arange(0, 1), v + tl.zeros([1], v.dtype))


@triton.jit
def _pids(n_cols):
    """(column pc, split, SPLIT, sample nb as int64) of this program: axis 0 is nb * n_cols + pc."""
    pid0 = tl.program_id(0)
    return pid0 % n_cols, tl.program_id(1), tl.num_programs(1), (pid0 // n_cols).to(tl.int64)


@triton.jit
def _part_row(PART, k, split, C):
    """Row k * SPLIT + split of a (rows, SPLIT, C)-shaped partial buffer, in int64 (a program index
    times a size)."""
    return PART + (k + split.to(tl.int64)) * C


@triton.jit
def _czeros(CL: tl.constexpr, ACC_T: tl.constexpr, BLOCK_J: tl.constexpr):
    if CL:
        return tl.zeros([BLOCK_J], ACC_T)
    else:
        return tl.zeros([1], ACC_T)


@triton.jit
def _stats_kernel(X, PART, C, I, J, row_stride, n_t, n_tj, x_nb, n_cols, ACC_T: tl.constexpr, CL: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """PART (NB, 4, SPLIT, C): this program's count, pivot, mean - pivot and M2 per channel. The pivot
    (the mean of the program's first tile) centres the values: fp32 means of data offset far from 0 are
    off by an ulp of the offset, which Chan's update would multiply into M2."""
    pc, split, SPLIT, nb = _pids(n_cols)
    X += nb * x_nb
    PART += nb * 4 * SPLIT * C
    offs, mask = _tile(split, pc, I, J, row_stride, n_tj, CL, BLOCK_I, BLOCK_J)
    pivot = _csum(tl.load(X + offs, mask=mask, other=0.0).to(ACC_T), CL) / tl.maximum(_csum(mask.to(ACC_T), CL), 1.0)
    cnt = _czeros(CL, ACC_T, BLOCK_J)
    mean = _czeros(CL, ACC_T, BLOCK_J)
    m2 = _czeros(CL, ACC_T, BLOCK_J)
    for t in range(split, n_t, SPLIT):
        offs, mask = _tile(t, pc, I, J, row_stride, n_tj, CL, BLOCK_I, BLOCK_J)
        v = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(ACC_T) - _tile_bc(pivot, CL), 0.0)
        c = _csum(mask.to(ACC_T), CL)  # 0 only in padding channels, never stored
        tile_mean = _csum(v, CL) / tl.maximum(c, 1.0)
        d = tl.where(mask, v - _tile_bc(tile_mean, CL), 0.0)
        tot = cnt + c
        delta = tile_mean - mean
        frac = c / tl.maximum(tot, 1.0)
        mean += delta * frac
        m2 += _csum(d * d, CL) + delta * delta * cnt * frac
        cnt = tot
    _cstore(_part_row(PART, 0, split, C), pc, cnt, C, CL, BLOCK_J)
    _cstore(_part_row(PART, SPLIT, split, C), pc, pivot, C, CL, BLOCK_J)
    _cstore(_part_row(PART, 2 * SPLIT, split, C), pc, mean, C, CL, BLOCK_J)
    _cstore(_part_row(PART, 3 * SPLIT, split, C), pc, m2, C, CL, BLOCK_J)


@triton.jit
def _combine_kernel(PART, OUT, C, SPLIT, BLOCK: tl.constexpr):
    """OUT (3, C): count, mean and M2 per channel from PART (4, SPLIT, C) (per program: count, pivot,
    mean - pivot, M2), combined by Chan's update in float64 (the pivots make the means exact), in
    program order: deterministic, and one launch instead of a dozen small torch ops."""
    ch = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cm = ch < C
    cnt = tl.zeros([BLOCK], tl.float64)
    mean = tl.zeros([BLOCK], tl.float64)
    m2 = tl.zeros([BLOCK], tl.float64)
    for k in range(0, SPLIT):
        c = tl.load(PART + k * C + ch, mask=cm, other=0.0).to(tl.float64)
        mk = tl.load(PART + (SPLIT + k) * C + ch, mask=cm, other=0.0).to(tl.float64) + \
            tl.load(PART + (2 * SPLIT + k) * C + ch, mask=cm, other=0.0).to(tl.float64)
        tot = cnt + c
        delta = mk - mean
        frac = c / tl.maximum(tot, 1.0)
        mean += delta * frac
        m2 += tl.load(PART + (3 * SPLIT + k) * C + ch, mask=cm, other=0.0).to(tl.float64) + delta * delta * cnt * frac
        cnt = tot
    out_t = OUT.dtype.element_ty
    tl.store(OUT + ch, cnt.to(out_t), mask=cm)
    tl.store(OUT + C + ch, mean.to(out_t), mask=cm)
    tl.store(OUT + 2 * C + ch, m2.to(out_t), mask=cm)


@triton.jit
def _affine_params(W, B, MEAN, RSTD, pc, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC_T: tl.constexpr,
                   CL: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per channel (mean, rstd, w, b) broadcastable over a tile; w = 1, b = 0 when absent."""
    mean = _tile_bc(_cload(MEAN, pc, C, CL, BLOCK_J).to(ACC_T), CL)
    rstd = _tile_bc(_cload(RSTD, pc, C, CL, BLOCK_J).to(ACC_T), CL)
    w = 1.0
    b = 0.0
    if HAS_W:
        w = _tile_bc(_cload(W, pc, C, CL, BLOCK_J).to(ACC_T), CL)
    if HAS_B:
        b = _tile_bc(_cload(B, pc, C, CL, BLOCK_J).to(ACC_T), CL)
    return mean, rstd, w, b


@triton.jit
def _elemt_kernel(X, W, B, Y, MEAN, RSTD, C, I, J, row_stride, n_t, n_tj, x_nb, n_cols, p_nb, slope_a, slope_b, slope_c,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr,
                  CL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    pc, split, SPLIT, nb = _pids(n_cols)
    X += nb * x_nb
    Y += nb * x_nb
    mean, rstd, w, b = _affine_params(W, B, MEAN + nb * p_nb, RSTD + nb * p_nb, pc, C, HAS_W, HAS_B, ACC_T, CL,
                                      BLOCK_J)
    scale = rstd * w
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    for t in range(split, n_t, SPLIT):
        offs, mask = _tile(t, pc, I, J, row_stride, n_tj, CL, BLOCK_I, BLOCK_J)
        z = (tl.load(X + offs, mask=mask, other=0.0).to(ACC_T) - mean) * scale + b
        tl.store(Y + offs, _act(z, ACT, slope).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_load(DY, X, offs, mask, mean, rstd, w, b, slope, ACT: tl.constexpr, ACC_T: tl.constexpr):
    """(xhat, dz) of one tile, zero where masked."""
    xhat = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(ACC_T) - mean) * rstd, 0.0)
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(ACC_T)
    if ACT != 0:
        dz = _act_grad(dz, xhat * w + b, ACT, slope)
    return xhat, dz


@triton.jit
def _bwd_reduce_kernel(DY, X, W, B, MEAN, RSTD, PART, C, I, J, row_stride, n_t, n_tj, x_nb, n_cols, p_nb, slope_a, slope_b, slope_c,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr,
                       CL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """PART (NB, 2, SPLIT, C): this program's sum(dz) and sum(dz * xhat) per channel."""
    pc, split, SPLIT, nb = _pids(n_cols)
    X += nb * x_nb
    DY += nb * x_nb
    PART += nb * 2 * SPLIT * C
    mean, rstd, w, b = _affine_params(W, B, MEAN + nb * p_nb, RSTD + nb * p_nb, pc, C, HAS_W, HAS_B, ACC_T, CL,
                                      BLOCK_J)
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    sdz = tl.zeros((BLOCK_I, BLOCK_J), ACC_T)
    sdzx = tl.zeros((BLOCK_I, BLOCK_J), ACC_T)
    for t in range(split, n_t, SPLIT):
        offs, mask = _tile(t, pc, I, J, row_stride, n_tj, CL, BLOCK_I, BLOCK_J)
        xhat, dz = _bwd_load(DY, X, offs, mask, mean, rstd, w, b, slope, ACT, ACC_T)
        sdz += dz
        sdzx += dz * xhat
    _cstore(_part_row(PART, 0, split, C), pc, _csum(sdz, CL), C, CL, BLOCK_J)
    _cstore(_part_row(PART, SPLIT, split, C), pc, _csum(sdzx, CL), C, CL, BLOCK_J)


@triton.jit
def _bwd_elemt_kernel(DY, X, W, B, DX, MEAN, RSTD, COEF, C, I, J, row_stride, n_t, n_tj, x_nb, n_cols, p_nb,
                      slope_a, slope_b, slope_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_COEF: tl.constexpr, ACT: tl.constexpr, ACC_T: tl.constexpr,
                      CL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """dx = rstd * (w * dz - a - xhat * b); COEF (NB, 2, C) = (a, b) per channel (training: BatchNorm's
    w * mean(dz), w * mean(dz * xhat)), absent in eval."""
    pc, split, SPLIT, nb = _pids(n_cols)
    X += nb * x_nb
    DY += nb * x_nb
    DX += nb * x_nb
    mean, rstd, w, b = _affine_params(W, B, MEAN + nb * p_nb, RSTD + nb * p_nb, pc, C, HAS_W, HAS_B, ACC_T, CL,
                                      BLOCK_J)
    if HAS_COEF:
        coef_a = _tile_bc(_cload(COEF + nb * 2 * p_nb, pc, C, CL, BLOCK_J), CL)
        coef_b = _tile_bc(_cload(COEF + nb * 2 * p_nb + C, pc, C, CL, BLOCK_J), CL)
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    for t in range(split, n_t, SPLIT):
        offs, mask = _tile(t, pc, I, J, row_stride, n_tj, CL, BLOCK_I, BLOCK_J)
        xhat, dz = _bwd_load(DY, X, offs, mask, mean, rstd, w, b, slope, ACT, ACC_T)
        g = dz * w
        if HAS_COEF:
            g = g - coef_a - xhat * coef_b
        tl.store(DX + offs, (g * rstd).to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _plan(x, cl: bool, per_sample: bool = False):
    """Kernel geometry for x (N, C, S) in its layout: (geometry args, meta-parameters, grid, NB). With
    ``per_sample`` (channels-last only) each sample is reduced apart (NB = N): grid axis 0 runs over
    (sample, column) pairs."""
    N, C, S = x.shape
    nb, x_nb = (N, S * C) if per_sample else (1, 0)
    if cl:
        I, J, row_stride = (S if per_sample else N * S), C, C
        bj = block_width(C, 64)
        bi = max(2, min(triton.next_power_of_2(I), TILE // bj))
        n_cols, n_tj, n_t = triton.cdiv(C, bj), 1, triton.cdiv(I, bi)
    else:
        assert not per_sample
        I, J, row_stride = N, S, C * S
        bj = block_width(S, 1024, min(triton.next_power_of_2(S), 128))  # runs of >= 128 elements: whole sectors
        bi = max(2, min(triton.next_power_of_2(N), TILE // bj))
        n_cols, n_tj = C, triton.cdiv(S, bj)
        n_t = triton.cdiv(N, bi) * n_tj
    split = max(1, min(n_t, triton.cdiv(target_programs(x.device, 8), n_cols * nb)))
    geo = (I, J, row_stride, n_t, n_tj, x_nb, n_cols)
    return geo, dict(CL=cl, BLOCK_I=bi, BLOCK_J=bj, num_warps=4), (n_cols * nb, split), nb


def stats(x, cl, acc, per_sample=False):
    """Per-program (count, pivot, mean - pivot, M2) per channel: (NB, 4, SPLIT, C) in ``acc`` (NB = N
    per sample, else 1)."""
    geo, meta, grid, nb = _plan(x, cl, per_sample)
    part = x.new_empty((nb, 4, grid[1], x.shape[1]), dtype=acc)
    _stats_kernel[grid](x, part, x.shape[1], *geo, ACC_T=_ACC[acc], **meta)
    return part


def combine(part, acc):
    """(3, C) count, mean, M2 in ``acc`` from one sample's (4, SPLIT, C) partials of ``stats``."""
    _, split, C = part.shape
    out = part.new_empty((3, C), dtype=acc)
    _combine_kernel[(triton.cdiv(C, 256),)](part, out, C, split, BLOCK=256, num_warps=4)
    return out


def _flags(w, b, act, slope, acc):
    return dict(HAS_W=w is not None, HAS_B=b is not None, ACT=ACTIVATIONS[act], ACC_T=_ACC[acc]), split_slope(slope)


def _p_nb(x, per_sample):
    return x.shape[1] if per_sample else 0  # per-sample statistics are (N, C)


def elemt(x, w, b, y, mean, rstd, act, slope, cl, per_sample=False):
    """y from x; mean and rstd (C,), or (N, C) per sample."""
    geo, meta, grid, _ = _plan(x, cl, per_sample)
    flags, slopes = _flags(w, b, act, slope, mean.dtype)
    _elemt_kernel[grid](x, w, b, y, mean, rstd, x.shape[1], *geo, _p_nb(x, per_sample), *slopes, **flags,
                        **meta)


def bwd_reduce(dy, x, w, b, mean, rstd, act, slope, cl, per_sample=False):
    """Per-program sum(dz) and sum(dz * xhat) per channel: (NB, 2, SPLIT, C)."""
    geo, meta, grid, nb = _plan(x, cl, per_sample)
    flags, slopes = _flags(w, b, act, slope, mean.dtype)
    part = x.new_empty((nb, 2, grid[1], x.shape[1]), dtype=mean.dtype)
    _bwd_reduce_kernel[grid](dy, x, w, b, mean, rstd, part, x.shape[1], *geo, _p_nb(x, per_sample), *slopes,
                             **flags, **meta)
    return part


def bwd_elemt(dy, x, w, b, dx, mean, rstd, coef, act, slope, cl, per_sample=False):
    """dx; coef (2, C), or (N, 2, C) per sample, or None (see _bwd_elemt_kernel)."""
    geo, meta, grid, _ = _plan(x, cl, per_sample)
    flags, slopes = _flags(w, b, act, slope, mean.dtype)
    _bwd_elemt_kernel[grid](dy, x, w, b, dx, mean, rstd, coef, x.shape[1], *geo, _p_nb(x, per_sample),
                            *slopes, HAS_COEF=coef is not None, **flags, **meta)

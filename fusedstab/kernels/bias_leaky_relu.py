"""Triton bias + Leaky ReLU kernels (forward and backward) and their launchers.

The ops see a 2-D (R, L) view of the activation in memory order (see fusedstab.autograd) with the
bias either per column (L == C: a Linear output, or channels_last NCHW with the bias on C) or per
row (bias index = row % C: NCHW with the bias on C, rows of H*W). One read and one write each way.

What backward needs of forward: for negative_slope >= 0 the sign of y is the sign of z = x + b
(y > 0 exactly where z > 0, including z that underflows to 0), so y itself is saved; for a negative
slope it is not, and forward packs the signs into a bit mask instead, (R, ceil(L/8)) uint8, bit j of
byte k of a row being column 8k + j. dbias: per-program partial sums reduced afterwards, no atomics.
"""
import triton
import triton.language as tl

from .common import _ACC, _acc, _slope, block_width, split_slope, target_programs

TILE = 4096  # elements per tile
MAX_BLOCK_L = 1024


@triton.jit
def _pack_bits(pos, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """(BLOCK_R, BLOCK_L) booleans -> (BLOCK_R, BLOCK_L // 8) bytes, column 8k + j in bit j of byte k."""
    bits = tl.reshape(pos.to(tl.int32), (BLOCK_R, BLOCK_L // 8, 8))
    return tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def store_mask(MASK, pos, rows64, rmask, col_tile, L8,
               BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Store the (BLOCK_R, BLOCK_L) booleans ``pos`` (False past the row's end, so that the padding
    bits are 0) at column tile ``col_tile`` of MASK (rows of L8 bytes). Shared with the matmul."""
    bcols = col_tile * (BLOCK_L // 8) + tl.arange(0, BLOCK_L // 8)
    tl.store(MASK + rows64[:, None] * L8 + bcols[None, :], _pack_bits(pos, BLOCK_R, BLOCK_L),
             mask=rmask[:, None] & (bcols < L8)[None, :])


@triton.jit
def _load_bits(MASK, rows64, rmask, col_tile, L8, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """The (BLOCK_R, BLOCK_L) booleans of column tile ``col_tile`` of MASK (rows of L8 bytes): one load
    of the (BLOCK_R, BLOCK_L // 8) byte tile (contiguous bytes, not a byte per element), expanded to
    bits in registers (the inverse of _pack_bits)."""
    bcols = col_tile * (BLOCK_L // 8) + tl.arange(0, BLOCK_L // 8)
    byte = tl.load(MASK + rows64[:, None] * L8 + bcols[None, :], mask=rmask[:, None] & (bcols < L8)[None, :],
                   other=0)
    bits = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_R, BLOCK_L)) != 0


@triton.jit
def _fwd_kernel(X, B, Y, MASK, R, L, C, L8, stride_xr, stride_xc, n_col_tiles, slope_a, slope_b, slope_c,
                HAS_B: tl.constexpr, PER_ROW: tl.constexpr, SAVE_MASK: tl.constexpr,
                ACC_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0)
    col_tile = pid % n_col_tiles
    rows = (pid // n_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = col_tile * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask, cmask = rows < R, cols < L
    mask = rmask[:, None] & cmask[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    z = tl.load(X + rows64[:, None] * stride_xr + cols64[None, :] * stride_xc, mask=mask, other=0.0).to(ACC_T)
    if HAS_B:
        if PER_ROW:
            z += tl.load(B + rows % C, mask=rmask, other=0.0).to(ACC_T)[:, None]
        else:
            z += tl.load(B + cols, mask=cmask, other=0.0).to(ACC_T)[None, :]
    y = tl.where(z > 0, z, z * _slope(slope_a, slope_b, slope_c, ACC_T))
    tl.store(Y + rows64[:, None] * L + cols64[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if SAVE_MASK:
        store_mask(MASK, (z > 0) & mask, rows64, rmask, col_tile, L8, BLOCK_R, BLOCK_L)


@triton.jit
def _bwd_kernel(DY, S, DX, DBP, R, L, L8, stride_dyr, stride_dyc, stride_sr, stride_sc,
                n_row_tiles, n_col_tiles, slope_a, slope_b, slope_c,
                USE_MASK: tl.constexpr, WRITE_DX: tl.constexpr, HAS_DB: tl.constexpr,
                PER_ROW: tl.constexpr, ACC_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Persistent over row tiles: program (g, col_tile) takes row tiles g, g + G, ... of one column
    tile. dbias partials: per column, a (G, L) buffer (PER_ROW False); per row, an (n_col_tiles, R)
    buffer (PER_ROW True)."""
    pid = tl.program_id(0)
    col_tile = pid % n_col_tiles
    g = pid // n_col_tiles
    G = tl.num_programs(0) // n_col_tiles
    cols = col_tile * BLOCK_L + tl.arange(0, BLOCK_L)
    cmask = cols < L
    cols64 = cols.to(tl.int64)
    slope = _slope(slope_a, slope_b, slope_c, ACC_T)
    acc = tl.zeros((BLOCK_R, BLOCK_L), ACC_T)
    for t in range(g, n_row_tiles, G):
        rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dyr + cols64[None, :] * stride_dyc,
                     mask=mask, other=0.0).to(ACC_T)
        if USE_MASK:
            pos = _load_bits(S, rows64, rmask, col_tile, L8, BLOCK_R, BLOCK_L)
        else:
            pos = tl.load(S + rows64[:, None] * stride_sr + cols64[None, :] * stride_sc,
                          mask=mask, other=0.0) > 0
        dz = tl.where(pos, dy, dy * slope)
        if WRITE_DX:
            tl.store(DX + rows64[:, None] * L + cols64[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        if HAS_DB:
            if PER_ROW:
                tl.store(DBP + col_tile.to(tl.int64) * R + rows64, tl.sum(dz, axis=1), mask=rmask)
            else:
                acc += dz  # masked lanes loaded dy = 0, so dz = 0 there
    if HAS_DB and not PER_ROW:
        tl.store(DBP + g.to(tl.int64) * L + cols64, tl.sum(acc, axis=0), mask=cmask)


def _blocks(L: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_L): TILE elements, BLOCK_L >= 8 (whole bytes of the bit mask), see block_width."""
    block_l = block_width(L, MAX_BLOCK_L, 8)
    return max(1, TILE // block_l), block_l


def _warps(block_r: int, block_l: int) -> int:
    return 8 if block_r * block_l >= 4096 else 4


def fwd(x, bias, y, mask, slope, per_row):
    """y (and mask, when given) from x (R, L), bias (C,) or None."""
    R, L = x.shape
    BLOCK_R, BLOCK_L = _blocks(L)
    n_col = triton.cdiv(L, BLOCK_L)
    grid = (triton.cdiv(R, BLOCK_R) * n_col,)
    C = 1 if bias is None else bias.shape[0]
    _fwd_kernel[grid](x, bias, y, mask, R, L, C, triton.cdiv(L, 8), x.stride(0), x.stride(1), n_col,
                      *split_slope(slope), HAS_B=bias is not None, PER_ROW=per_row, SAVE_MASK=mask is not None,
                      ACC_T=_ACC[_acc(y.dtype)],
                      BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, num_warps=_warps(BLOCK_R, BLOCK_L))


def bwd(dy, saved, dx, slope, use_mask, per_row, need_db):
    """dx (unless None) and the dbias partials: (G, L) per column or (n_col_tiles, R) per row, in the
    accumulation dtype (None without need_db)."""
    R, L = dy.shape
    BLOCK_R, BLOCK_L = _blocks(L)
    n_row, n_col = triton.cdiv(R, BLOCK_R), triton.cdiv(L, BLOCK_L)
    G = max(1, min(n_row, triton.cdiv(target_programs(dy.device, 4), n_col)))
    acc = _acc(dy.dtype)
    part = None
    if need_db:
        part = dy.new_empty((n_col, R) if per_row else (G, L), dtype=acc)
    s_strides = (0, 0) if use_mask else saved.stride()
    _bwd_kernel[(G * n_col,)](dy, saved, dx, part, R, L, triton.cdiv(L, 8), dy.stride(0), dy.stride(1),
                              *s_strides, n_row, n_col, *split_slope(slope),
                              USE_MASK=use_mask, WRITE_DX=dx is not None, HAS_DB=need_db, PER_ROW=per_row,
                              ACC_T=_ACC[acc], BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L,
                              num_warps=_warps(BLOCK_R, BLOCK_L))
    return part

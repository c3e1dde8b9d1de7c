"""Triton LayerNorm / RMSNorm kernels, with an optional fused residual add, and their launchers.

Forward: y = (h - mean) * rstd * w + b with h = x (+ residual, stored once: the pre-norm block's
residual stream); mean and rstd saved in the accumulation dtype (fp32; fp64 for fp64 input).
Backward: dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)) (+ grad of the residual output);
dw, db as per-program partial sums in an fp32 (G, N) buffer, reduced afterwards: no atomics, so
backward is deterministic.

Two shapes of kernel: rows that fit in registers are processed BLOCK_M at a time with the whole row
in one tile (one read, one write); longer rows loop over chunks (statistics by Chan's parallel
combine in one pass, then a second pass to normalize, which re-reads mostly from L2).
"""
import torch
import triton
import triton.language as tl

# Longest row held in registers whole (forward / backward, elements). Longer rows take the chunked path.
MAX_FUSED_FWD = 65536
MAX_FUSED_BWD = 16384
LONG_BLOCK = 4096  # chunk length of the chunked path
_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _rsqrt(v, ACC_T: tl.constexpr):
    if ACC_T == tl.float64:
        return 1.0 / tl.sqrt(v)  # IEEE sqrt in fp64 (gradcheck precision)
    else:
        return tl.rsqrt(v)


@triton.jit
def _load_h(X, R, H, x_offs, r_offs, h_offs, mask,
            HAS_R: tl.constexpr, STORE_H: tl.constexpr, ACC_T: tl.constexpr):
    """Load a tile of x (+ residual). The sum is rounded to h's dtype first, so that forward
    normalizes exactly the h that it stores and that backward reads."""
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC_T)
    if HAS_R:
        h = (x + tl.load(R + r_offs, mask=mask, other=0.0).to(ACC_T)).to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + h_offs, h, mask=mask)
        return h.to(ACC_T)
    else:
        return x


@triton.jit
def _fwd_rows_kernel(X, R, W, B, Y, H, MEAN, RSTD, M, N, stride_x, stride_r, eps,
                     HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RMS: tl.constexpr, ACC_T: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    c = cols[None, :]
    out = rows64[:, None] * N + c  # Y and H are contiguous
    h = _load_h(X, R, H, rows64[:, None] * stride_x + c, rows64[:, None] * stride_r + c, out,
                mask, HAS_R, HAS_R, ACC_T)
    if RMS:
        hc = h
    else:
        mean = tl.sum(h, axis=1) / N
        hc = tl.where(mask, h - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=rmask)
    rstd = _rsqrt(tl.sum(hc * hc, axis=1) / N + eps, ACC_T)
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = hc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(ACC_T)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(ACC_T)[None, :]
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_long_kernel(X, R, W, B, Y, H, MEAN, RSTD, M, N, stride_x, stride_r, eps,
                     HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RMS: tl.constexpr, ACC_T: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    # Pass 1: mean and sum of squared deviations, combining chunks as Chan et al. do (stable).
    mean = tl.zeros([1], dtype=ACC_T)
    m2 = tl.zeros([1], dtype=ACC_T)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        mask = c < N
        h = _load_h(X, R, H, row * stride_x + c, row * stride_r + c, row * N + c, mask, HAS_R, HAS_R, ACC_T)
        if RMS:
            m2 += tl.sum(h * h, axis=0)
        else:
            cnt = tl.minimum(N - start, BLOCK_N).to(ACC_T)
            tot = start + cnt
            cmean = tl.sum(h, axis=0) / cnt
            d = tl.where(mask, h - cmean, 0.0)
            delta = cmean - mean
            mean += delta * (cnt / tot)
            m2 += tl.sum(d * d, axis=0) + delta * delta * (start * (cnt / tot))
    rstd = _rsqrt(m2 / N + eps, ACC_T)
    if not RMS:
        tl.store(MEAN + row + tl.arange(0, 1), mean)
    tl.store(RSTD + row + tl.arange(0, 1), rstd)
    # Pass 2: normalize (re-reads the row, from L2 where it still fits).
    for start in range(0, N, BLOCK_N):
        c = start + cols
        mask = c < N
        h = _load_h(X, R, H, row * stride_x + c, row * stride_r + c, c, mask, HAS_R, False, ACC_T)
        if RMS:
            y = h * rstd
        else:
            y = (h - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + c, mask=mask, other=0.0).to(ACC_T)
        if HAS_B:
            y = y + tl.load(B + c, mask=mask, other=0.0).to(ACC_T)
        tl.store(Y + row * N + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows_kernel(DY, X, W, MEAN, RSTD, DH, DX, DW_PART, DB_PART, M, N,
                     stride_dy, stride_x, stride_dh,
                     HAS_W: tl.constexpr, HAS_DB: tl.constexpr, HAS_DH: tl.constexpr,
                     RMS: tl.constexpr, ACC_T: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Persistent: program p takes row blocks p, p + G, ... and keeps its dw/db partials in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC_T)
    dw = tl.zeros([BLOCK_N], dtype=ACC_T)
    db = tl.zeros([BLOCK_N], dtype=ACC_T)
    for blk in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC_T)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC_T)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(ACC_T)
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_DB:
            db += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DW_PART + pid * N + cols, dw, mask=cmask)
    if HAS_DB:
        tl.store(DB_PART + pid * N + cols, db, mask=cmask)


@triton.jit
def _bwd_long_kernel(DY, X, W, MEAN, RSTD, DH, DX, DW_PART, DB_PART, M, N,
                     stride_dy, stride_x, stride_dh,
                     HAS_W: tl.constexpr, HAS_DB: tl.constexpr, HAS_DH: tl.constexpr,
                     RMS: tl.constexpr, ACC_T: tl.constexpr, BLOCK_N: tl.constexpr):
    # Persistent over rows; the partials (zero-initialised) are this program's own row of the
    # (G, N) buffer, updated chunk by chunk: still no atomics.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    for row in range(pid, M, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        rstd = tl.load(RSTD + row64)
        if RMS:
            mean = 0.0
        else:
            mean = tl.load(MEAN + row64)
        c1 = tl.zeros([1], dtype=ACC_T)
        c2 = tl.zeros([1], dtype=ACC_T)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            x = tl.load(X + row64 * stride_x + c, mask=mask, other=0.0).to(ACC_T)
            dy = tl.load(DY + row64 * stride_dy + c, mask=mask, other=0.0).to(ACC_T)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_W:
                dy = dy * tl.load(W + c, mask=mask, other=0.0).to(ACC_T)
            c1 += tl.sum(xhat * dy, axis=0)
            c2 += tl.sum(dy, axis=0)
        c1 = c1 / N
        c2 = c2 / N
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            x = tl.load(X + row64 * stride_x + c, mask=mask, other=0.0).to(ACC_T)
            dy = tl.load(DY + row64 * stride_dy + c, mask=mask, other=0.0).to(ACC_T)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_W:
                wdy = dy * tl.load(W + c, mask=mask, other=0.0).to(ACC_T)
            else:
                wdy = dy
            if RMS:
                dx = (wdy - xhat * c1) * rstd
            else:
                dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row64 * stride_dh + c, mask=mask, other=0.0).to(ACC_T)
            tl.store(DX + row64 * N + c, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                p = DW_PART + pid * N + c
                tl.store(p, tl.load(p, mask=mask, other=0.0) + dy * xhat, mask=mask)
            if HAS_DB:
                p = DB_PART + pid * N + c
                tl.store(p, tl.load(p, mask=mask, other=0.0) + dy, mask=mask)


def _rows_config(n: int):
    """Rows per program and warps for the whole-row kernels: tiles of at least ~4K elements, about
    8 to 64 elements per thread (few registers per row even at 64K, so no spills). Untuned on a GPU."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    tile = block_m * block_n
    num_warps = min(max(tile // 256, 4), 32)
    return block_m, block_n, num_warps


def fwd(x, residual, weight, bias, y, h, mean, rstd, eps: float, rms: bool):
    """x, residual: (M, N) with unit column stride and one row stride; y, h: contiguous outputs."""
    M, N = x.shape
    common = dict(HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                  RMS=rms, ACC_T=_ACC[rstd.dtype])
    mean = None if rms else mean  # RMSNorm has none (an empty tensor's pointer may be null)
    args = (x, residual, weight, bias, y, h, mean, rstd, M, N, x.stride(0),
            residual.stride(0) if residual is not None else 0, eps)
    if N <= MAX_FUSED_FWD:
        block_m, block_n, num_warps = _rows_config(N)
        _fwd_rows_kernel[(triton.cdiv(M, block_m),)](
            *args, **common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        _fwd_long_kernel[(M,)](*args, **common, BLOCK_N=LONG_BLOCK, num_warps=8)


def bwd(dy, x, weight, mean, rstd, dh, dx, need_dw: bool, need_db: bool, rms: bool, num_programs: int):
    """Returns the (G, N) partial sums of dw and db (or None); dx is written in place."""
    M, N = x.shape
    acc = rstd.dtype
    long = N > MAX_FUSED_BWD
    if long:
        grid = max(1, min(M, num_programs))
    else:
        block_m, block_n, num_warps = _rows_config(N)
        grid = max(1, min(triton.cdiv(M, block_m), num_programs))
    alloc = torch.zeros if long else torch.empty
    dw_part = alloc((grid, N), dtype=acc, device=x.device) if need_dw else None
    db_part = alloc((grid, N), dtype=acc, device=x.device) if need_db else None
    common = dict(HAS_W=weight is not None, HAS_DB=need_db, HAS_DH=dh is not None,
                  RMS=rms, ACC_T=_ACC[acc])
    mean = None if rms else mean
    args = (dy, x, weight, mean, rstd, dh, dx, dw_part, db_part, M, N,
            dy.stride(0), x.stride(0), dh.stride(0) if dh is not None else 0)
    if long:
        _bwd_long_kernel[(grid,)](*args, **common, BLOCK_N=LONG_BLOCK, num_warps=8)
    else:
        _bwd_rows_kernel[(grid,)](*args, **common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dw_part, db_part

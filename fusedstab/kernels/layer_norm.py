"""Triton LayerNorm / RMSNorm kernels, with an optional fused residual add, and their launchers.

Forward: y = (h - mean) * rstd * w + b with h = x (+ residual, stored once: the pre-norm block's
residual stream); mean and rstd saved in the accumulation dtype (fp32; fp64 for fp64 input).
Backward: dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)) (+ grad of the residual output);
dw, db as per-program partial sums in an fp32 (G, N) buffer, reduced afterwards in a fixed order: no
atomics, so backward is deterministic.

Three shapes of kernel:
- rows (N <= MAX_FUSED_FWD forward, MAX_FUSED_BWD backward): BLOCK_M whole rows in one tile, one
  read and one write; backward persistent (two programs per SM), dw/db partials in registers.
- long rows, many of them (forward only): a program per row, statistics by Chan's parallel combine
  over chunks, then a second pass that normalizes (re-reading the row, mostly from L2).
- split (long rows in backward; any row of >= SPLIT_MIN_N elements when rows are fewer than SMs):
  each row's reduction is split over SPLIT programs (grid (M, SPLIT)) that write partial statistics
  to a small (M, ., SPLIT) buffer; a second kernel combines a row's partials in a fixed order and
  finishes. Backward's second kernel runs on a (chunk, row group) grid whose programs keep their
  chunk of dw/db in registers over their rows: the partial buffer is (row groups, N), written once
  (the chunked backward this replaces read-modify-wrote a 2 x SMs x N buffer per chunk of every row).
Offsets that multiply a program index by a size are int64.
"""
import torch
import triton
import triton.language as tl

from .common import _rsqrt, sm_count

# Longest row held in registers whole (forward / backward, elements): no spills for sm_90a at 16 warps
# (benchmarks/kernel_report.md). Longer rows take the chunked / split paths.
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
LONG_BLOCK = 4096  # chunk length of the chunked and split paths
SPLIT_MIN_N = 16384  # fewer rows than SMs and at least this long: each row split over programs
MAX_BLOCK_M = 1024
_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


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
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W_IN_LOOP: tl.constexpr):
    # Persistent: program p takes row blocks p, p + G, ... and keeps its dw/db partials in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W and not W_IN_LOOP:
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
            if W_IN_LOOP:  # long rows: w re-read from L1 each block rather than held (16 registers)
                w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC_T)
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
    out = pid.to(tl.int64) * N + cols  # int64: a program index times a size
    if HAS_W:
        tl.store(DW_PART + out, dw, mask=cmask)
    if HAS_DB:
        tl.store(DB_PART + out, db, mask=cmask)


@triton.jit
def _split_coords(BLOCK_N: tl.constexpr):
    """(row as int64, split, SPLIT) of the row-split kernels: grid (M, SPLIT)."""
    return tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)


@triton.jit
def _fwd_split_stats_kernel(X, R, H, PART, M, N, stride_x, stride_r,
                            HAS_R: tl.constexpr, RMS: tl.constexpr, ACC_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows split over SPLIT programs, pass 1: program (row, s) takes chunks s, s + SPLIT, ... of its
    row (h = x + residual stored on the way) and writes its (count, mean, M2) (RMS: count, 0, sum of
    squares) to PART (M, 3, SPLIT)."""
    row, s, SPLIT = _split_coords(BLOCK_N)
    cols = tl.arange(0, BLOCK_N)
    cnt = tl.zeros([1], dtype=ACC_T)
    mean = tl.zeros([1], dtype=ACC_T)
    m2 = tl.zeros([1], dtype=ACC_T)
    for start in range(s * BLOCK_N, N, SPLIT * BLOCK_N):
        c = start + cols
        mask = c < N
        h = _load_h(X, R, H, row * stride_x + c, row * stride_r + c, row * N + c, mask, HAS_R, HAS_R, ACC_T)
        if RMS:
            m2 += tl.sum(h * h, axis=0)
        else:
            n_c = tl.minimum(N - start, BLOCK_N).to(ACC_T)
            tot = cnt + n_c
            cmean = tl.sum(h, axis=0) / n_c
            d = tl.where(mask, h - cmean, 0.0)
            delta = cmean - mean
            mean += delta * (n_c / tot)
            m2 += tl.sum(d * d, axis=0) + delta * delta * (cnt * (n_c / tot))
            cnt = tot
    out = PART + row * 3 * SPLIT + s + tl.arange(0, 1)
    tl.store(out, cnt)
    tl.store(out + SPLIT, mean)
    tl.store(out + 2 * SPLIT, m2)


@triton.jit
def _split_stats(PART, row, N, SPLIT, eps, RMS: tl.constexpr, ACC_T: tl.constexpr, SPLIT_P2: tl.constexpr):
    """(mean, rstd) of a row from its SPLIT partials, combined in a fixed order (every program of the
    row gets the same values)."""
    k = tl.arange(0, SPLIT_P2)
    km = k < SPLIT
    base = PART + row * 3 * SPLIT
    m2 = tl.load(base + 2 * SPLIT + k, mask=km, other=0.0)
    if RMS:
        return 0.0, _rsqrt(tl.sum(m2, axis=0) / N + eps, ACC_T)
    else:
        cnt = tl.load(base + k, mask=km, other=0.0)
        pmean = tl.load(base + SPLIT + k, mask=km, other=0.0)
        mean = tl.sum(cnt * pmean, axis=0) / N
        d = pmean - mean
        return mean, _rsqrt((tl.sum(m2, axis=0) + tl.sum(cnt * d * d, axis=0)) / N + eps, ACC_T)


@triton.jit
def _fwd_split_norm_kernel(X, H, W, B, Y, MEAN, RSTD, PART, M, N, stride_x, eps,
                           HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           RMS: tl.constexpr, ACC_T: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_P2: tl.constexpr):
    """Pass 2: the row's statistics from PART (program s == 0 stores them), then its chunks normalized
    (h re-read from H, which pass 1 wrote, when there is a residual: one tensor instead of two)."""
    row, s, SPLIT = _split_coords(BLOCK_N)
    mean, rstd = _split_stats(PART, row, N, SPLIT, eps, RMS, ACC_T, SPLIT_P2)
    if s == 0:
        if not RMS:
            tl.store(MEAN + row + tl.arange(0, 1), mean + tl.zeros([1], ACC_T))
        tl.store(RSTD + row + tl.arange(0, 1), rstd + tl.zeros([1], ACC_T))
    cols = tl.arange(0, BLOCK_N)
    for start in range(s * BLOCK_N, N, SPLIT * BLOCK_N):
        c = start + cols
        mask = c < N
        if HAS_R:
            h = tl.load(H + row * N + c, mask=mask, other=0.0).to(ACC_T)
        else:
            h = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(ACC_T)
        y = (h - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + c, mask=mask, other=0.0).to(ACC_T)
        if HAS_B:
            y = y + tl.load(B + c, mask=mask, other=0.0).to(ACC_T)
        tl.store(Y + row * N + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_split_sums_kernel(DY, X, W, MEAN, RSTD, PART, M, N, stride_dy, stride_x,
                           HAS_W: tl.constexpr, RMS: tl.constexpr, ACC_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward of long rows (or few rows), pass 1: program (row, s) sums xhat * w * dy and w * dy over
    chunks s, s + SPLIT, ... of its row into PART (M, 2, SPLIT)."""
    row, s, SPLIT = _split_coords(BLOCK_N)
    rstd = tl.load(RSTD + row)
    if RMS:
        mean = 0.0
    else:
        mean = tl.load(MEAN + row)
    cols = tl.arange(0, BLOCK_N)
    c1 = tl.zeros([BLOCK_N], dtype=ACC_T)
    c2 = tl.zeros([BLOCK_N], dtype=ACC_T)
    for start in range(s * BLOCK_N, N, SPLIT * BLOCK_N):
        c = start + cols
        mask = c < N
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(ACC_T)
        wdy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(ACC_T)
        if HAS_W:
            wdy = wdy * tl.load(W + c, mask=mask, other=0.0).to(ACC_T)
        c1 += tl.where(mask, (x - mean) * rstd, 0.0) * wdy
        c2 += wdy
    out = PART + row * 2 * SPLIT + s + tl.arange(0, 1)
    tl.store(out, tl.sum(c1, axis=0) + tl.zeros([1], ACC_T))
    tl.store(out + SPLIT, tl.sum(c2, axis=0) + tl.zeros([1], ACC_T))


@triton.jit
def _bwd_split_chunk_kernel(DY, X, W, MEAN, RSTD, DH, DX, PART, DW_PART, DB_PART, M, N, SPLIT,
                            stride_dy, stride_x, stride_dh,
                            HAS_W: tl.constexpr, HAS_DB: tl.constexpr, HAS_DH: tl.constexpr,
                            RMS: tl.constexpr, ACC_T: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_P2: tl.constexpr):
    """Pass 2 over a 2-D grid (chunk, row group rg): dx of the chunk for rows rg, rg + RG, ...,
    with this chunk's dw / db summed over those rows in registers and stored once, as row rg of the
    (RG, N) partial buffers (no read-modify-write of partials through global memory)."""
    c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # chunks on axis 0: any N
    rg = tl.program_id(1)
    RG = tl.num_programs(1)
    mask = c < N
    if HAS_W:
        w = tl.load(W + c, mask=mask, other=0.0).to(ACC_T)
    k = tl.arange(0, SPLIT_P2)
    km = k < SPLIT
    dw = tl.zeros([BLOCK_N], dtype=ACC_T)
    db = tl.zeros([BLOCK_N], dtype=ACC_T)
    for r in range(rg, M, RG):
        row = tl.cast(r, tl.int64)  # the interpreter gives a plain int
        part = PART + row * 2 * SPLIT
        c1 = tl.sum(tl.load(part + k, mask=km, other=0.0), axis=0) / N
        c2 = tl.sum(tl.load(part + SPLIT + k, mask=km, other=0.0), axis=0) / N
        rstd = tl.load(RSTD + row)
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(ACC_T)
        dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(ACC_T)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        if HAS_W:
            wdy = dy * w
        else:
            wdy = dy
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + c, mask=mask, other=0.0).to(ACC_T)
        tl.store(DX + row * N + c, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_DB:
            db += dy
    out = rg.to(tl.int64) * N + c
    if HAS_W:
        tl.store(DW_PART + out, dw, mask=mask)
    if HAS_DB:
        tl.store(DB_PART + out, db, mask=mask)


def _rows_config(n: int):
    """(BLOCK_M, BLOCK_N, num_warps) of the whole-row kernels: tiles of at least 4K elements (BLOCK_M
    whole rows: 64 rows of a 64-element QK-norm, not 16), at most 16 warps (ptxas caps a thread at 64
    registers at 32 warps: the forward at N = 65536 spilled there) and 16 elements a thread for rows up
    to 8K (32 at 16K)."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(MAX_BLOCK_M, 4096 // block_n))
    return block_m, block_n, max(4, min(16, block_m * block_n // 512))


def _fits(N: int, limit: int) -> bool:
    """Whether rows of N take the whole-row kernels: up to ``limit`` when N is a multiple of 16 (vector
    loads), half of it otherwise (scalar loads need an address register per element: they spill)."""
    return N <= (limit if N % 16 == 0 else limit // 2)


def _split(M: int, N: int, device) -> int:
    """Programs per row for the row-split paths: enough to give every SM two programs, at most one
    per chunk."""
    return max(1, min(triton.cdiv(N, LONG_BLOCK), triton.cdiv(2 * sm_count(device), M)))


def _few_rows(M: int, N: int, device) -> bool:
    """Rows too few to fill the GPU one program per row, and long enough to be worth splitting."""
    return M < sm_count(device) and N >= SPLIT_MIN_N


def fwd(x, residual, weight, bias, y, h, mean, rstd, eps: float, rms: bool):
    """x, residual: (M, N) with unit column stride and one row stride; y, h: contiguous outputs;
    mean, rstd: (M,) outputs (mean unused for RMSNorm)."""
    M, N = x.shape
    common = dict(HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                  RMS=rms, ACC_T=_ACC[rstd.dtype])
    mean = None if rms else mean  # RMSNorm has none (an empty tensor's pointer may be null)
    stride_r = residual.stride(0) if residual is not None else 0
    args = (x, residual, weight, bias, y, h, mean, rstd, M, N, x.stride(0), stride_r, eps)
    if _fits(N, MAX_FUSED_FWD) and not _few_rows(M, N, x.device):
        block_m, block_n, num_warps = _rows_config(N)
        _fwd_rows_kernel[(triton.cdiv(M, block_m),)](
            *args, **common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    elif M >= sm_count(x.device):  # many long rows: a program per row, its second pass from L2
        _fwd_long_kernel[(M,)](*args, **common, BLOCK_N=LONG_BLOCK, num_warps=8)
    else:  # few rows: each split over programs (statistics exchanged through a small buffer)
        split = _split(M, N, x.device)
        part = x.new_empty((M, 3, split), dtype=rstd.dtype)
        _fwd_split_stats_kernel[(M, split)](x, residual, h, part, M, N, x.stride(0), stride_r, HAS_R=common["HAS_R"],
                                            RMS=rms, ACC_T=common["ACC_T"], BLOCK_N=LONG_BLOCK, num_warps=8)
        _fwd_split_norm_kernel[(M, split)](x, h, weight, bias, y, mean, rstd, part, M, N, x.stride(0), eps, **common,
                                           BLOCK_N=LONG_BLOCK, SPLIT_P2=triton.next_power_of_2(split), num_warps=8)


def bwd(dy, x, weight, mean, rstd, dh, dx, dw, db, rms: bool):
    """dx (M, N) contiguous, and dw, db (N,) (or None) written here: per-program partial sums in the
    accumulation dtype, reduced in a fixed order (deterministic, no atomics)."""
    M, N = x.shape
    acc = rstd.dtype
    common = dict(HAS_W=weight is not None, HAS_DB=db is not None, HAS_DH=dh is not None, RMS=rms, ACC_T=_ACC[acc])
    mean = None if rms else mean
    strides = (dy.stride(0), x.stride(0), dh.stride(0) if dh is not None else 0)
    programs = 2 * sm_count(x.device)
    if _fits(N, MAX_FUSED_BWD) and not _few_rows(M, N, x.device):
        block_m, block_n, num_warps = _rows_config(N)
        grid = max(1, min(triton.cdiv(M, block_m), programs))
        dw_part = x.new_empty((grid, N), dtype=acc) if dw is not None else None
        db_part = x.new_empty((grid, N), dtype=acc) if db is not None else None
        _bwd_rows_kernel[(grid,)](dy, x, weight, mean, rstd, dh, dx, dw_part, db_part, M, N, *strides, **common,
                                  BLOCK_M=block_m, BLOCK_N=block_n, W_IN_LOOP=block_n >= 8192, num_warps=num_warps)
    else:  # long rows, or few: row sums split over programs, then a (chunk, row group) grid
        split = _split(M, N, x.device)
        part = x.new_empty((M, 2, split), dtype=acc)
        _bwd_split_sums_kernel[(M, split)](dy, x, weight, mean, rstd, part, M, N, dy.stride(0), x.stride(0),
                                           HAS_W=weight is not None, RMS=rms, ACC_T=_ACC[acc], BLOCK_N=LONG_BLOCK,
                                           num_warps=8)
        chunks = triton.cdiv(N, LONG_BLOCK)
        groups = max(1, min(M, triton.cdiv(programs, chunks)))
        dw_part = x.new_empty((groups, N), dtype=acc) if dw is not None else None
        db_part = x.new_empty((groups, N), dtype=acc) if db is not None else None
        _bwd_split_chunk_kernel[(chunks, groups)](
            dy, x, weight, mean, rstd, dh, dx, part, dw_part, db_part, M, N, split, *strides, **common,
            BLOCK_N=LONG_BLOCK, SPLIT_P2=triton.next_power_of_2(split), num_warps=8)
    if dw is not None:
        torch.sum(dw_part, 0, out=dw) if dw.dtype == acc else dw.copy_(dw_part.sum(0))
    if db is not None:
        torch.sum(db_part, 0, out=db) if db.dtype == acc else db.copy_(db_part.sum(0))

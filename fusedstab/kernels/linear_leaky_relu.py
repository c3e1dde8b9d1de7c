"""Triton matmul y = leaky_relu(x @ w.T + b) with the bias and activation in the epilogue.

x (M, K) and w (N, K) with any strides, y (M, N) contiguous. Accumulation in fp32 (fp64 for fp64
input under the interpreter), the bias added to the fp32 accumulator, one rounding to y's dtype.
For a negative slope the epilogue also writes the sign bit mask of fusedstab.kernels.bias_leaky_relu,
whose backward kernel turns dy into dz = dy * leaky_relu'(z) and dbias in one pass.

Tiles: the grouped ordering of the Triton matmul tutorial (GROUP_M row tiles share a column
panel of w in L2); tails are masked along K, and along M and N only at the store (out-of-range
rows and columns of x and w are read modulo M and N, so the main loop has no M/N masks).
"""
import os

import torch
import triton
import triton.language as tl

from .common import _ACC, _slope, fp32_matmul_allows_tf32, split_slope
from .bias_leaky_relu import store_mask


def gpu_configs():
    """Hopper/Ampere bf16/fp16 configs (Triton matmul tutorial and persistent-matmul tutorial sets)."""
    c = lambda m, n, k, s, w, g=8: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g},  # noqa: E731
                                                  num_stages=s, num_warps=w)
    return [c(128, 256, 64, 3, 8), c(256, 128, 64, 3, 8), c(128, 128, 64, 4, 8), c(128, 128, 64, 4, 4),
            c(128, 64, 64, 4, 4), c(64, 128, 64, 4, 4), c(64, 64, 64, 4, 4), c(128, 128, 32, 4, 4),
            c(64, 32, 32, 5, 2), c(32, 64, 32, 5, 2)]


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter: one small config, no tuning
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4)]
    return gpu_configs()


# fp32 accumulator values a thread holds (BLOCK_M * BLOCK_N / threads) from which the sign-mask
# epilogue spills for sm_90a (benchmarks/kernel_report.md: 128x256 and 256x128 at 8 warps, 128x128x64
# at 4 warps; the tile alone fits).
MASK_EPILOGUE_MAX_ACC = 128


def prune_configs(configs, named_args, **kwargs):
    """Configs for this call: with the sign-mask epilogue (SAVE_MASK) those that would spill are left out."""
    if not kwargs.get("SAVE_MASK", named_args.get("SAVE_MASK", False)):
        return configs
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < MASK_EPILOGUE_MAX_ACC * 32 * c.num_warps]
    return kept or configs


def m_bucket(M: int) -> int:
    """The autotune key's row count: the next power of two (16 to 16384), so that each new token count
    does not re-tune 10 configs on the spot."""
    return max(16, min(triton.next_power_of_2(M), 16384))


# Keyed on the M bucket, the shape of w, the dot precision and the epilogue (bias, mask): a config tuned
# without the mask epilogue is never reused with it. Argument dtypes are part of the key anyway.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "INPUT_PRECISION", "HAS_B", "SAVE_MASK"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _linear_leaky_relu_kernel(X, W, B, Y, MASK, M, M_BUCKET, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                              slope_a, slope_b, slope_c, HAS_B: tl.constexpr, SAVE_MASK: tl.constexpr,
                              INPUT_PRECISION: tl.constexpr, ACC_T: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    group_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_m)
    pid_n = (pid % (GROUP_M * n_n)) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/columns past the end wrap around (valid addresses, results never stored).
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    a_ptrs = X + am[:, None] * stride_xm + rk[None, :].to(tl.int64) * stride_xk
    b_ptrs = W + rk[:, None].to(tl.int64) * stride_wk + bn[None, :] * stride_wn  # b[k, n] = w[n, k]
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_T)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk

    nmask = rn < N
    if HAS_B:
        acc += tl.load(B + rn, mask=nmask, other=0.0).to(ACC_T)[None, :]
    y = tl.where(acc > 0, acc, acc * _slope(slope_a, slope_b, slope_c, ACC_T))
    rmask = rm < M
    rows64 = rm.to(tl.int64)
    tl.store(Y + rows64[:, None] * N + rn[None, :], y.to(Y.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])
    if SAVE_MASK:
        store_mask(MASK, (acc > 0) & nmask[None, :], rows64, rmask, pid_n, tl.cdiv(N, 8), BLOCK_M, BLOCK_N)


def input_precision(dtype: torch.dtype) -> str | None:
    """fp32 runs on tf32 tensor cores only where torch's own matmuls may (the flag is read for fp32
    only, through torch's new API where it exists: see common.fp32_matmul_allows_tf32)."""
    if dtype != torch.float32:
        return None
    return "tf32" if fp32_matmul_allows_tf32() else "ieee"


def linear_leaky_relu(x, w, b, y, mask, slope):
    """y (M, N) = leaky_relu(x @ w.T + b), and the sign mask when ``mask`` is given."""
    M, K = x.shape
    N = w.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _linear_leaky_relu_kernel[grid](
        x, w, b, y, mask, M, m_bucket(M), N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), *split_slope(slope),
        HAS_B=b is not None, SAVE_MASK=mask is not None, INPUT_PRECISION=input_precision(x.dtype),
        ACC_T=_ACC[torch.float64 if x.dtype == torch.float64 else torch.float32])

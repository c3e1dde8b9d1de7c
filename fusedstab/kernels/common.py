"""Pieces the Triton kernels share: accumulation dtypes, the fp64-exact slope argument, the activations
the norms fuse, tile widths that pad little, and how many programs fill the device."""
import functools
import math

import torch
import triton
import triton.language as tl

_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "silu": 3}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_slope(slope: float) -> tuple[float, float, float]:
    """fp32 parts whose fp64 sum is exactly ``slope`` (NaN and inf: the first part alone)."""
    parts = []
    for _ in range(3):
        part = float(torch.tensor(slope, dtype=torch.float32))
        parts.append(part)
        slope = slope - part if math.isfinite(part) else 0.0
    return tuple(parts)


@triton.jit
def _slope(slope_a, slope_b, slope_c, ACC_T: tl.constexpr):
    # Triton passes Python floats as fp32: an fp64 slope travels as three fp32 parts (72 bits >= 53).
    return tl.cast(slope_a, ACC_T) + tl.cast(slope_b, ACC_T) + tl.cast(slope_c, ACC_T)


@triton.jit
def _act(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        return tl.where(z < 0, 0.0, z)  # NaN stays NaN, as torch's relu
    elif ACT == 2:
        return tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        return z / (1.0 + tl.exp(-z))
    else:
        return z


@triton.jit
def _act_grad(dy, z, ACT: tl.constexpr, slope):
    if ACT == 1:
        return tl.where(z <= 0, 0.0, dy)  # as torch's threshold_backward: NaN passes dy
    elif ACT == 2:
        return tl.where(z > 0, dy, dy * slope)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        return dy * s * (1.0 + z * (1.0 - s))
    else:
        return dy


def block_width(L: int, widest: int, smallest: int = 2) -> int:
    """A power-of-two tile width for rows of L: the widest (<= ``widest``) that pads a row by at most
    1/16 (L = 3136 takes 256: 13 tiles, where 1024 would pad it to 4096), else the one padding least."""
    top = max(smallest, min(triton.next_power_of_2(L), widest))
    widths = [w for w in (top >> i for i in range(5)) if w >= smallest]
    padded = lambda w: triton.cdiv(L, w) * w - L  # noqa: E731
    return next((w for w in widths if 16 * padded(w) <= L), min(widths, key=padded))


@functools.lru_cache(None)
def target_programs(device: torch.device, per_sm: int) -> int:
    """Programs that fill the device: ``per_sm`` per SM on CUDA; 4 under the interpreter."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4

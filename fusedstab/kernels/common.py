"""Pieces the Triton kernels share: accumulation dtypes, the fp64-exact slope argument, the activations
the norms fuse, tile widths that pad little, how many programs fill the device (and a simulated GPU
for the CPU-side checks), and whether fp32 matmuls may run on tf32 tensor cores."""
import contextlib
import dataclasses
import functools
import math
import os

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
def _rsqrt(v, ACC_T: tl.constexpr):
    if ACC_T == tl.float64:
        return 1.0 / tl.sqrt(v)  # IEEE sqrt in fp64 (gradcheck precision)
    else:
        return tl.rsqrt(v)


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


# ----------------------------------------------------------------------------- the device launchers size for
@dataclasses.dataclass(frozen=True)
class GPU:
    """What the launchers need to know of a GPU."""
    name: str
    sm_count: int
    capability: tuple[int, int]


H100 = GPU("NVIDIA H100 (simulated)", 132, (9, 0))
_simulated: list[GPU] = []

# CUDA's launch limits: grid axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535.
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


@contextlib.contextmanager
def simulate_gpu(gpu: GPU = H100):
    """Launchers size grids and tiles for ``gpu`` whatever the tensors' device (e.g. meta tensors): how
    the kernel report and the grid-limit tests see, on a CPU, the launches an H100 would get."""
    _simulated.append(gpu)
    try:
        yield gpu
    finally:
        _simulated.pop()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_of(device: torch.device) -> GPU | None:
    """The GPU that kernels on ``device`` run on; None where they run in the interpreter (CPU tensors,
    or TRITON_INTERPRET=1), whose launches stay small."""
    if _simulated:
        return _simulated[-1]
    if device.type != "cuda" or _interpret():
        return None
    return _cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(None)
def _cuda_gpu(index: int) -> GPU:
    p = torch.cuda.get_device_properties(index)
    return GPU(p.name, p.multi_processor_count, (p.major, p.minor))


def target_programs(device: torch.device, per_sm: int) -> int:
    """Programs that fill the device: ``per_sm`` per SM on a GPU; 4 under the interpreter."""
    gpu = gpu_of(device)
    return 4 if gpu is None else per_sm * gpu.sm_count


def sm_count(device: torch.device) -> int:
    """SMs of the device (4 under the interpreter: the same small grids as target_programs)."""
    gpu = gpu_of(device)
    return 4 if gpu is None else gpu.sm_count


# ----------------------------------------------------------------------------- tf32
def fp32_matmul_allows_tf32() -> bool:
    """Whether torch lets fp32 matmuls run on tf32 tensor cores. Read through torch's new API
    (``torch.backends.cuda.matmul.fp32_precision``, which inherits ``torch.backends.fp32_precision``)
    where it exists: once a user has set either, reading the legacy ``allow_tf32`` raises (torch >= 2.9,
    "mix of the legacy and new APIs"). "none" means neither was set, so the legacy flag decides."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: the legacy flag only
        return bool(matmul.allow_tf32)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # mixed APIs: torch itself would refuse to say; take its default
        return False

"""Timers (CUDA: triton's do_bench; CPU: perf_counter median) and two yardsticks measured in the same
run: the copy bandwidth (memory-bound ops) and a matmul's TFLOP/s (compute-bound ops)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def make_thunk(fn: Callable, inputs: list, grads: list, mode: str) -> Callable[[], object]:
    """The zero-argument callable that is timed for ``mode``.

    bwd times only the backward: the graph is built once here and replayed with retain_graph.
    Gradients go through autograd.grad so nothing accumulates into ``.grad`` between reps.
    """
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "bwd":
        outs = as_tuple(fn(*inputs))
        return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(as_tuple(fn(*inputs)), inputs, grads)
    raise ValueError(f"unknown mode {mode!r}")


def time_ms(thunk: Callable, device: str, quick: bool = False) -> float:
    """Median milliseconds per call of ``thunk``, warmed up."""
    if device == "cuda":
        import triton.testing

        # do_bench warms up, flushes L2 before each rep and times with CUDA events.
        return float(triton.testing.do_bench(thunk, warmup=10 if quick else 25, rep=40 if quick else 100,
                                             return_mode="median"))
    return _cpu_time_ms(thunk, reps=5 if quick else 9)


def once_ms(thunk: Callable, device: str) -> tuple[float, object]:
    """One call's milliseconds and its result (``--tiny``: checks that a provider runs, times nothing)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = thunk()
    sync()
    return (time.perf_counter() - t0) * 1e3, out


def _cpu_time_ms(thunk: Callable, reps: int, budget_s: float = 1.0) -> float:
    thunk()  # warm-up (first call may compile)
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        thunk()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: str, mib: int) -> dict:
    """Device-to-device copy ``dst.copy_(src)`` of ``mib`` MiB; bytes counted = read + written."""
    n = (mib << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return {"gbps": nbytes / ms / 1e6, "ms": ms, "bytes": nbytes, "buffer_mib": mib}


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> dict:
    """TFLOP/s of one square ``n`` x ``n`` matmul in ``dtype`` (cuBLAS / the CPU BLAS): the practical
    ceiling for the compute-bound ops (attention, Linear + Leaky ReLU)."""
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    ms = time_ms(lambda: a @ b, device, quick=True)
    return {"tflops": 2 * n ** 3 / ms / 1e9, "ms": ms, "n": n, "dtype": str(dtype).removeprefix("torch.")}

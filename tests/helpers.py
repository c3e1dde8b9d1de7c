"""Shared test helpers: devices, per-dtype tolerances, and the "at most 2x eager torch" rule.

Tolerance rule (DESIGN.md, Tests):
- fp32 / fp64 results: tight absolute + relative tolerance against a float64 truth (``TIGHT``; the
  absolute part is scaled by max(1, max|truth|, scale) so that large parameter gradients, sums over
  many rows, and input gradients that cancel, are held to the same relative precision); eager torch
  in the same dtype must agree on dtype, shape and device.
- fp16 / bf16 results: the kernel's max error against the float64 truth must be at most
  ``LOWP_RATIO`` times eager torch's own max error against that truth, plus a tiny absolute floor
  (``LOWP_FLOOR``) for the case where torch happens to be exact.
"""
from __future__ import annotations

import pytest
import torch

# (rtol, atol) for fp32/fp64 results.
TIGHT = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}
LOWP_RATIO = 2.0
LOWP_FLOOR = {
    torch.float16: 1e-5,
    torch.bfloat16: 1e-4,
}

# Devices: CPU always (Triton through the interpreter), CUDA only under the gpu mark.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Input dtypes per device: the interpreter can't do bf16 reliably, so bf16 is GPU-only.
CPU_DTYPES = (torch.float32, torch.float16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def device_dtypes(cpu_dtypes=CPU_DTYPES, gpu_dtypes=GPU_DTYPES):
    """pytest params of (device, dtype): every CPU dtype, and every GPU dtype under the gpu mark."""
    out = [pytest.param("cpu", dt, id=f"cpu-{_short(dt)}") for dt in cpu_dtypes]
    out += [pytest.param("cuda", dt, id=f"cuda-{_short(dt)}", marks=pytest.mark.gpu) for dt in gpu_dtypes]
    return out


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_matches(got: torch.Tensor, truth64: torch.Tensor, eager: torch.Tensor, what: str = "",
                   scale: float | None = None) -> None:
    """``got`` (the fusedstab result) against a float64 ``truth64`` and eager torch's ``eager``
    (whose dtype, shape and device ``got`` must have), by the per-dtype rule above. ``scale``: the
    magnitude of the terms that the result sums where it exceeds max|truth| (cancellation), which
    the fp32/fp64 absolute tolerance is relative to."""
    assert got.shape == eager.shape, f"{what}: shape {tuple(got.shape)} != torch's {tuple(eager.shape)}"
    assert got.dtype == eager.dtype, f"{what}: dtype {got.dtype} != torch's {eager.dtype}"
    assert got.device == eager.device, f"{what}: device {got.device} != torch's {eager.device}"
    assert truth64.dtype == torch.float64
    if got.numel() == 0:
        return
    assert torch.isfinite(truth64).all(), f"{what}: non-finite truth; use the NaN/Inf checks instead"
    assert torch.isfinite(got).all(), f"{what}: non-finite values where the truth is finite"
    dt = got.dtype
    if dt in LOWP_FLOOR:
        err, err_torch = max_err(got, truth64), max_err(eager, truth64)
        bound = LOWP_RATIO * err_torch + LOWP_FLOOR[dt]
        assert err <= bound, (f"{what} ({dt}): max error vs float64 {err:.3e} > {LOWP_RATIO}x torch's "
                              f"{err_torch:.3e} + {LOWP_FLOOR[dt]:.0e}")
    else:
        # Eager torch is checked only for dtype/shape/device here: in fp32 its own error can exceed
        # the tight tolerance (e.g. LayerNorm over one element), so the float64 truth is the judge.
        rtol, atol = TIGHT[dt]
        atol = atol * max(1.0, truth64.abs().max().item(), scale or 0.0)
        torch.testing.assert_close(got.double(), truth64, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} ({dt}) vs float64 truth: {m}")


def assert_same_nonfinite(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same NaN positions, same +-Inf positions, and close finite values."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected)), f"{what}: +Inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), f"{what}: -Inf positions differ"
    torch.testing.assert_close(got, expected, equal_nan=True, msg=lambda m: f"{what}: {m}")

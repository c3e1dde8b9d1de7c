"""Shared test helpers: devices, per-dtype tolerances, and the "at most 2x eager torch" rule.

Tolerance rule (DESIGN.md, Tests):
- fp32 / fp64 results: tight absolute + relative tolerance against a float64 truth (``TIGHT``; the
  absolute part is relative to a scale: max(1, max|truth|) by default, so that large parameter
  gradients, sums over many rows, are held to the same relative precision; or a caller's per-row
  conditioning scale where the result cancels); eager torch in the same dtype must agree on dtype,
  shape and device.
- fp16 / bf16 results: the kernel's max error against the float64 truth must be at most
  ``LOWP_RATIO`` times eager torch's own max error against that truth, plus a tiny absolute floor
  (``LOWP_FLOOR``) for the case where torch happens to be exact. Where a caller passes the
  conditioning ``scale`` of an input gradient that cancels (RMSNorm over one element: dx ~ eps/x^3),
  the floor also admits the fp32 accumulation's own rounding on that scale (``ACC_ULPS`` fp32 ulps),
  which no fp32-accumulating kernel can beat and torch only sometimes does by luck of ordering.
"""
from __future__ import annotations

import contextlib

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
ACC_ULPS = 4 * torch.finfo(torch.float32).eps

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


def check_like_eager(got: torch.Tensor, truth64: torch.Tensor, eager: torch.Tensor, what: str = "") -> bool:
    """``got`` has eager torch's shape, dtype and device, and is finite where the float64 ``truth64``
    is. Returns whether there are values left to compare (False for an empty result)."""
    assert got.shape == eager.shape, f"{what}: shape {tuple(got.shape)} != torch's {tuple(eager.shape)}"
    assert got.dtype == eager.dtype, f"{what}: dtype {got.dtype} != torch's {eager.dtype}"
    assert got.device == eager.device, f"{what}: device {got.device} != torch's {eager.device}"
    assert truth64.dtype == torch.float64
    if got.numel() == 0:
        return False
    assert torch.isfinite(truth64).all(), f"{what}: non-finite truth; use the NaN/Inf checks instead"
    assert torch.isfinite(got).all(), f"{what}: non-finite values where the truth is finite"
    return True


def assert_matches(got: torch.Tensor, truth64: torch.Tensor, eager: torch.Tensor, what: str = "",
                   scale: float | torch.Tensor | None = None) -> None:
    """``got`` (the fusedstab result) against a float64 ``truth64`` and eager torch's ``eager``
    (whose dtype, shape and device ``got`` must have), by the per-dtype rule above.

    ``scale`` (a number, or a tensor that broadcasts to ``got``, e.g. one value per row): the size of
    the terms the result is computed from, where it exceeds max|truth| because of cancellation
    (rows of nearly equal values, input gradients). The fp32/fp64 absolute tolerance is relative to
    it; default max(1, max|truth|)."""
    if not check_like_eager(got, truth64, eager, what):
        return
    dt = got.dtype
    if scale is None:
        scale = max(1.0, truth64.abs().max().item())
    if dt in LOWP_FLOOR:
        err, err_torch = max_err(got, truth64), max_err(eager, truth64)
        smax = scale.max().item() if isinstance(scale, torch.Tensor) else scale
        floor = LOWP_FLOOR[dt] + ACC_ULPS * smax
        bound = LOWP_RATIO * err_torch + floor
        assert err <= bound, (f"{what} ({dt}): max error vs float64 {err:.3e} > {LOWP_RATIO}x torch's "
                              f"{err_torch:.3e} + {floor:.1e}")
    else:
        # Eager torch is checked only for dtype/shape/device here: in fp32 its own error can exceed
        # the tight tolerance (e.g. LayerNorm over one element), so the float64 truth is the judge.
        rtol, atol = TIGHT[dt]
        diff = (got.double() - truth64).abs()
        allowed = atol * scale + rtol * truth64.abs()
        bad = diff > allowed
        if bad.any():
            i = int(torch.argmax((diff / allowed).flatten()))
            idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), got.shape))
            raise AssertionError(
                f"{what} ({dt}) vs float64 truth: {int(bad.sum())} / {got.numel()} elements off; worst at "
                f"{idx}: got {got[idx].item():.9g}, truth {truth64[idx].item():.9g}, |diff| "
                f"{diff[idx].item():.3e} > allowed {allowed[idx].item():.3e} "
                f"(rtol {rtol}, atol {atol} x scale)")


def assert_same_nonfinite(got: torch.Tensor, expected: torch.Tensor, what: str = "",
                          atol: float | None = None) -> None:
    """Same NaN positions, same +-Inf positions, and close finite values (assert_close's default
    tolerance for the dtype, or rtol 1e-5 and ``atol`` where given)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected)), f"{what}: +Inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), f"{what}: -Inf positions differ"
    tol = {} if atol is None else dict(rtol=1e-5, atol=atol)
    torch.testing.assert_close(got, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


# ----------------------------------------------------------------------------- shared test plumbing
def leaf(t, dtype=None, requires_grad=True):
    """Detached copy sharing t's storage and strides (clone() would densify slices), optionally in
    another dtype (which keeps the strides of a dense layout), requiring grad."""
    if t is None:
        return None
    c = t.detach()
    if dtype is not None and dtype != c.dtype:
        c = c.to(dtype)
    return c.requires_grad_(requires_grad)


def run(fn, leaves, dy, backend=None):
    """Output of fn(*leaves) and the gradients of sum(out * dy) w.r.t. the leaves (None for leaves
    that are None or do not require grad), under ``backend`` when given."""
    import fusedstab

    with fusedstab.use_backend(backend) if backend else contextlib.nullcontext():
        out = fn(*leaves)
        req = [t for t in leaves if t is not None and t.requires_grad]
        gs = iter(torch.autograd.grad(out, req, dy)) if req else iter(())
    grads = [next(gs) if t is not None and t.requires_grad else None for t in leaves]
    return out.detach(), grads


def keeps_layout(t: torch.Tensor) -> bool:
    """The layouts fusedstab reads in place and gives back: contiguous and channels_last(_3d). Any
    other layout is read through a contiguous copy and gives a contiguous output."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return t.is_contiguous() or (fmt is not None and t.is_contiguous(memory_format=fmt))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides in every dim of size > 1 (a size-1 dim's stride means nothing)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def leaky_relu_factor(z, slope):
    """d leaky_relu / dz in z's dtype (torch's rule: 1 where z > 0, else slope, also at z == 0)."""
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))


def assert_raises_like_torch(torch_call, fs_call, match=None):
    """fusedstab raises exactly the exception type torch raises (a subclass such as BackendError
    does not count), with a non-empty message matching ``match`` where given."""
    with pytest.raises(Exception) as t_info:
        torch_call()
    with pytest.raises(Exception) as f_info:
        fs_call()
    assert type(f_info.value) is type(t_info.value), (
        f"torch raises {type(t_info.value).__name__}({t_info.value}), "
        f"fusedstab raises {type(f_info.value).__name__}({f_info.value})")
    assert str(f_info.value)
    if match is not None:
        f_info.match(match)


def graph_recorder():
    """An aot_eager-like compile backend that keeps the forward and backward graphs it is given:
    (backend, {"fw": [...], "bw": [...]})."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")), graphs


# ----------------------------------------------------------------------------- fused activations
def act_fn(y, activation, slope=0.01):
    """The activation as a torch user writes it after the op it is fused into (None: none)."""
    import torch.nn.functional as F

    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, slope)
    if activation == "silu":
        return F.silu(y)
    raise ValueError(activation)


def act_grad_bound(activation, slope=0.01) -> float:
    """max |d act / dz| (silu's derivative peaks at ~1.0998)."""
    return {None: 1.0, "relu": 1.0, "leaky_relu": max(1.0, abs(slope)), "silu": 1.1}[activation]


# ----------------------------------------------------------------------------- 2-process gloo tests
def test_backends() -> list[str]:
    """The backends the op tests run on: FUSEDSTAB_TEST_BACKENDS (comma-separated) if set, else the
    registry's backends that this process can run and that implement every op (the cpu one too where
    CI requires it with FUSEDSTAB_REQUIRE_EXT=1). tests/conftest.py parametrizes ``backend`` with them;
    the 2-process gloo tests hand them to their workers."""
    import os

    from fusedstab import backend

    if os.environ.get("FUSEDSTAB_TEST_BACKENDS"):
        return [b.strip() for b in os.environ["FUSEDSTAB_TEST_BACKENDS"].split(",")]
    names = backend.available_backends()
    complete = [b for b in names if all(b in impls for impls in backend._impls.values())]
    require = os.environ.get("FUSEDSTAB_REQUIRE_EXT") == "1"
    return [b for b in backend.BACKENDS if b in complete or (b == "cpu" and require)]


test_backends.__test__ = False  # a helper, not a test


def init_gloo(rank: int, init_file: str, world: int) -> None:
    import datetime
    import os
    import sys

    import torch.distributed as dist

    # loopback only: gloo picks the hostname's interface otherwise, which hangs in some sandboxes
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def recorder(res: dict):
    """``record(key, fn)``: res[key] = fn(), or the error it raised (every case is recorded; the test
    decides)."""
    import traceback

    def record(key, fn):
        try:
            res[key] = fn()
        except Exception as e:
            res[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}

    return record


def run_gloo_workers(worker, tmp, world: int, timeout_s: float) -> dict:
    """Spawn ``worker(rank, init_file, out_dir, backends)`` on ``world`` ranks (each saves its results
    to out_dir/rank{r}.pt) and return {rank: results}; fail past ``timeout_s``."""
    import time

    import torch.multiprocessing as mp

    start = time.time()
    ctx = mp.start_processes(worker, args=(str(tmp / "store"), str(tmp), test_backends()), nprocs=world,
                             join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=5):
            if time.time() - start > timeout_s:
                pytest.fail(f"the {world} gloo workers did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return {r: torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)}


def rank_result(results: dict, rank: int, key):
    """One recorded result, failing the test with the worker's traceback where it raised."""
    v = results[rank][key]
    if isinstance(v, dict) and "error" in v:
        pytest.fail(f"rank {rank} {key}: {v['error']}\n{v['traceback']}")
    return v

"""What the launchers would launch, seen without running anything: for the CPU-side checks.

``record_launches()`` intercepts ``kernel[grid](...)`` (JIT, interpreted and autotuned kernels alike)
and records a ``Launch`` (kernel, grid, arguments, meta-parameters) instead of running it; an
autotuned kernel records one launch per config. With ``common.simulate_gpu()`` the launchers size
their grids and tiles for an H100 whatever the tensors' device, so meta tensors (no memory) at any
shape show what a GPU would get. ``cases()`` calls every launcher over a sweep of shapes and dtypes.

Users: tests/test_kernels_launch_limits.py (grid limits at shapes no CPU could run) and
benchmarks/kernel_report.py (compiles each recorded launch for sm_90a with the GPU machine's triton).
Nothing here runs on the normal paths of the library.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Iterator

import torch


@dataclasses.dataclass
class Launch:
    kernel: Any   # the JITFunction (or InterpretedFunction); an autotuner's inner kernel
    name: str     # the kernel's function name
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict  # constexpr arguments given by name and launch options (num_warps, num_stages, ...)
    label: str = ""  # the case that launched it (set by run_cases)

    @property
    def num_warps(self) -> int:
        return int(self.kwargs.get("num_warps", 4))

    def arg(self, name: str):
        """The value of argument ``name`` (positional or keyword)."""
        names = _param_names(self.kernel)
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[names.index(name)]


def _param_names(kernel) -> list[str]:
    fn = getattr(kernel, "fn", kernel)
    return list(inspect.signature(fn).parameters)


def _grid(kernel, grid, args, kwargs) -> tuple[int, int, int]:
    if callable(grid):
        meta = dict(zip(_param_names(kernel), args))
        meta.update(kwargs)
        grid = grid(meta)
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within: ``kernel[grid](...)`` appends a Launch to the yielded list and runs nothing."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            if isinstance(self, Autotuner):
                todo = [(self.fn, {**kwargs, **cfg.all_kwargs()}) for cfg in self.configs]
            else:
                todo = [(self, dict(kwargs))]
            for kernel, kw in todo:
                name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
                launches.append(Launch(kernel, name, _grid(kernel, grid, args, kw), args, kw))
        return launch

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


def run_cases(cases: list[tuple[str, Callable[[], None]]]) -> list[Launch]:
    """Run each case's thunk under a simulated H100 and record its launches, labelled by the case."""
    from .common import simulate_gpu

    out: list[Launch] = []
    with simulate_gpu(), record_launches() as launches:
        for label, thunk in cases:
            start = len(launches)
            thunk()
            for launch in launches[start:]:
                launch.label = label
            if len(launches) == start:
                raise AssertionError(f"case {label}: nothing launched")
        out.extend(launches)
    return out


# ----------------------------------------------------------------------------- the cases
def _meta(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        t = t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def _ncs(x4):
    """The (N, C, S) view the ops see (spatial dims flattened; a view in both memory formats)."""
    return x4.flatten(2) if x4.dim() > 2 else x4.unsqueeze(2)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_norm_cases(shapes, dtypes, acts=("none", "silu")):
    """(N, C, *spatial, G, channels_last) shapes: the launches of fusedstab.ops.group_norm's triton backend."""
    from . import batch_norm as KB
    from . import group_norm as K

    cases = []
    for (N, C, *sp, G, cl) in shapes:
        for dtype in dtypes:
            for act in acts:
                def thunk(N=N, C=C, sp=tuple(sp), G=G, cl=cl, dtype=dtype, act=act):
                    acc = _acc(dtype)
                    x4 = _meta(N, C, *sp, dtype=dtype, channels_last=cl)
                    x = _ncs(x4)
                    w, b = _meta(C, dtype=dtype), _meta(C, dtype=dtype)
                    mean, rstd = _meta(N, G, dtype=acc), _meta(N, G, dtype=acc)
                    y = torch.empty_like(x)
                    if x.shape[2] == 1 and K.rows_ok(C, G):
                        K.rows_fwd(x[:, :, 0], w, b, y[:, :, 0], mean, rstd, G, 1e-5, act, 0.01)
                        K.rows_bwd(y[:, :, 0], x[:, :, 0], w, b, mean, rstd, y[:, :, 0], _meta(C, dtype=acc),
                                   _meta(C, dtype=acc), G, act, 0.01)
                    elif x.transpose(1, 2).is_contiguous():  # channels innermost: BatchNorm kernels per sample
                        KB.stats(x, True, acc, per_sample=True)
                        mc, rc = _meta(N, C, dtype=acc), _meta(N, C, dtype=acc)
                        KB.elemt(x, w, b, y, mc, rc, act, 0.01, True, per_sample=True)
                        KB.bwd_reduce(y, x, w, b, mc, rc, act, 0.01, True, per_sample=True)
                        KB.bwd_elemt(y, x, w, b, y, mc, rc, _meta(N, 2, C, dtype=acc), act, 0.01, True, per_sample=True)
                    else:
                        KB.combine(K.fwd_stats(x, G), acc)
                        K.fwd_norm(x, w, b, y, mean, rstd, G, act, 0.01)
                        gpart, _ = K.bwd_reduce(y, x, w, b, mean, rstd, G, act, 0.01)
                        K.bwd_dx(y, x, w, b, y, mean, rstd, gpart.sum(1), G, act, 0.01)
                label = f"group_norm {N}x{C}x{'x'.join(map(str, sp)) or '-'} G={G}{' cl' if cl else ''} {dtype} {act}"
                cases.append((label, thunk))
    return cases


def batch_norm_cases(shapes, dtypes, acts=("none", "relu")):
    """(N, C, *spatial, channels_last) shapes: fusedstab.ops.batch_norm's triton launches."""
    from . import batch_norm as K

    cases = []
    for (N, C, *sp, cl) in shapes:
        for dtype in dtypes:
            for act in acts:
                def thunk(N=N, C=C, sp=tuple(sp), cl=cl, dtype=dtype, act=act):
                    acc = _acc(dtype)
                    x4 = _meta(N, C, *sp, dtype=dtype, channels_last=cl)
                    x = _ncs(x4)
                    inner = x.transpose(1, 2).is_contiguous() and (x.shape[2] == 1 or not x.is_contiguous())
                    w, b, mean, rstd = (_meta(C, dtype=t) for t in (dtype, dtype, acc, acc))
                    y = torch.empty_like(x)
                    K.combine(K.stats(x, inner, acc)[0], acc)
                    K.elemt(x, w, b, y, mean, rstd, act, 0.01, inner)
                    K.bwd_reduce(y, x, w, b, mean, rstd, act, 0.01, inner)
                    K.bwd_elemt(y, x, w, b, y, mean, rstd, _meta(2, C, dtype=acc), act, 0.01, inner)
                label = f"batch_norm {N}x{C}x{'x'.join(map(str, sp)) or '-'}{' cl' if cl else ''} {dtype} {act}"
                cases.append((label, thunk))
    return cases


def cases(kind: str = "report") -> list[tuple[str, Callable[[], None]]]:
    """Every launcher over a sweep: ``report`` (representative launch configurations, what CI compiles),
    ``full`` (more shapes), ``large`` (shapes at the grid limits, for tests that run nothing).
    Labels with "aligned" mark cases whose sizes are all multiples of 16."""
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    if kind == "large":
        return (group_norm_cases([(70000, 64, 2, 2, 8, True), (100000, 64, 8, False), (70000, 32, 4, 4, 32, False),
                                  (100000, 16384, 2, False)], [bf16], acts=("none",))
                + batch_norm_cases([(100000, 64, False), (70000, 64, 4, 4, True), (70000, 8, 4, 4, False)], [bf16],
                                   acts=("none",)))
    out = []
    out += group_norm_cases([(1, 2048, 16, 16, 32, False), (1, 512, 64, 64, 32, True), (32, 256, 56, 56, 32, False)],
                            [bf16, fp32], acts=("none", "silu"))
    out += batch_norm_cases([(128, 256, 56, 56, False), (128, 256, 56, 56, True), (131072, 1024, False)],
                            [bf16, fp32], acts=("none", "relu"))
    return [(f"{label} aligned" if _aligned_label(label) else label, thunk) for label, thunk in out]


def _aligned_label(label: str) -> bool:
    import re as _re

    nums = [int(n) for n in _re.findall(r"(?<![A-Za-z=])(\d+)", label.split(" torch.")[0])]
    return all(n % 16 == 0 or n == 1 for n in nums[1:]) if nums else False

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
import math
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
            if isinstance(self, Autotuner):  # every config it would try (after its pruning)
                configs = self.configs
                if self.early_config_prune:
                    configs = self.early_config_prune(configs, dict(zip(self.arg_names, args)), **kwargs)
                todo = [(self.fn, {**kwargs, **cfg.all_kwargs()}) for cfg in configs]
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
                S = math.prod(sp)
                aligned = (C // G) % 16 == 0 if S == 1 else (C % 16 == 0 if cl else S % 16 == 0)
                label = f"group_norm {N}x{C}x{'x'.join(map(str, sp)) or '-'} G={G}{' cl' if cl else ''} {dtype} {act}"
                cases.append((label + (" [aligned]" if aligned else ""), thunk))
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
                S = math.prod(sp)
                aligned = C % 16 == 0 if (cl or S == 1) else S % 16 == 0
                label = f"batch_norm {N}x{C}x{'x'.join(map(str, sp)) or '-'}{' cl' if cl else ''} {dtype} {act}"
                cases.append((label + (" [aligned]" if aligned else ""), thunk))
    return cases


def layer_norm_cases(shapes, dtypes, ops=("layer_norm", "rms_norm", "add_layer_norm")):
    """(M, N) shapes: fusedstab.ops.layer_norm's triton launches (forward and backward)."""
    from . import layer_norm as K

    cases = []
    for (M, N) in shapes:
        for dtype in dtypes:
            for op in ops:
                def thunk(M=M, N=N, dtype=dtype, op=op):
                    acc = _acc(dtype)
                    rms, has_r, has_b = op == "rms_norm", op == "add_layer_norm", op != "rms_norm"
                    x = _meta(M, N, dtype=dtype)
                    w = _meta(N, dtype=dtype)
                    b = _meta(N, dtype=dtype) if has_b else None
                    r = _meta(M, N, dtype=dtype) if has_r else None
                    mean, rstd = _meta(M, dtype=acc), _meta(M, dtype=acc)
                    y, h = _meta(M, N, dtype=dtype), (_meta(M, N, dtype=dtype) if has_r else None)
                    K.fwd(x, r, w, b, y, h, mean, rstd, 1e-5, rms)
                    K.bwd(y, x, w, mean, rstd, y if has_r else None, y, _meta(N, dtype=dtype),
                          _meta(N, dtype=dtype) if has_b else None, rms)
                cases.append((f"{op} {M}x{N} {dtype}" + (" [aligned]" if N % 16 == 0 else ""), thunk))
    return cases


def attention_cases(shapes, dtypes, variants=("plain",)):
    """(B, Hq, Hkv, L, S, E) shapes; variants: "plain", "causal", "dropout", "mask" (additive, with its
    gradient), "precise", each optionally "+fwd" or "+bwd" (one direction only):
    fusedstab.kernels.attention's launches."""
    from . import attention as A

    cases = []
    for (B, Hq, Hkv, L, S, E) in shapes:
        for dtype in dtypes:
            for variant in variants:
                def thunk(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, dtype=dtype, variant=variant):
                    q, do = _meta(B, Hq, L, E, dtype=dtype), _meta(B, Hq, L, E, dtype=dtype)
                    k, v = _meta(B, Hkv, S, E, dtype=dtype), _meta(B, Hkv, S, E, dtype=dtype)
                    kind, _, only = variant.partition("+")
                    mask = _meta(1, 1, L, S, dtype=dtype) if kind == "mask" else None
                    kw = dict(causal=kind == "causal", scale=E ** -0.5, dropout_p=0.1 if kind == "dropout" else 0.0,
                              seed=1, precise=kind == "precise")
                    if only != "bwd":
                        o, lse = A.attention_fwd(q, k, v, mask, **kw)
                    else:
                        o, lse = _meta(B, Hq, L, E, dtype=dtype), _meta(B, Hq, L, dtype=torch.float32)
                    if only != "fwd":
                        A.attention_bwd(do, q, k, v, o, lse, mask, mask_needs_grad=mask is not None, **kw)
                cases.append((f"attention {B}x{Hq}/{Hkv}x{L}x{S}x{E} {dtype} {variant}", thunk))
    return cases


def clip_cases(sizes_list, dtypes):
    """Lists of tensor sizes: fusedstab.kernels.multi_tensor's norm and scale launches (norm 2 and inf),
    and the gradient statistics of fusedstab.kernels.grad_stats over the same chunk table."""
    from . import grad_stats as GS
    from . import multi_tensor as K

    cases = []
    for sizes in sizes_list:
        for dtype in dtypes:
            def thunk(sizes=sizes, dtype=dtype):
                ts = [_meta(n, dtype=dtype) for n in sizes]
                acc = _acc(dtype)
                K.norm(ts, 2.0, _meta(len(ts), dtype=acc))
                K.norm(ts, float("inf"), _meta(len(ts), dtype=acc))
                K.scale_(ts, _meta(1, dtype=acc), False)
                GS.stats(ts, _meta(3, len(ts), dtype=acc))
            aligned = all(n % 16 == 0 for n in sizes)
            cases.append((f"clip {len(sizes)} tensors {max(sizes)} {dtype}" + (" [aligned]" if aligned else ""), thunk))
    return cases


def bias_leaky_relu_cases(shapes, dtypes, slopes=(0.01, -0.5)):
    """(R, L, per_row) views: fusedstab.kernels.bias_leaky_relu's launches (y saved, or the bit mask
    for a negative slope)."""
    from . import bias_leaky_relu as K

    cases = []
    for (R, L, per_row) in shapes:
        for dtype in dtypes:
            for slope in slopes:
                def thunk(R=R, L=L, per_row=per_row, dtype=dtype, slope=slope):
                    x, y = _meta(R, L, dtype=dtype), _meta(R, L, dtype=dtype)
                    bias = _meta(16 if per_row else L, dtype=dtype)
                    mask = _meta(R, (L + 7) // 8, dtype=torch.uint8) if slope < 0 else None
                    K.fwd(x, bias, y, mask, slope, per_row)
                    K.bwd(y, mask if slope < 0 else y, y, slope, slope < 0, per_row, True)
                label = f"bias_leaky_relu {R}x{L}{' per_row' if per_row else ''} {dtype} slope={slope}"
                cases.append((label + (" [aligned]" if L % 16 == 0 else ""), thunk))
    return cases


def linear_cases(shapes, dtypes, slopes=(0.01, -0.5)):
    """(M, K, N): fusedstab.kernels.linear_leaky_relu's launches (every autotune config)."""
    from . import linear_leaky_relu as K

    cases = []
    for (M, Kd, N) in shapes:
        for dtype in dtypes:
            for slope in slopes:
                def thunk(M=M, Kd=Kd, N=N, dtype=dtype, slope=slope):
                    x, w, b = _meta(M, Kd, dtype=dtype), _meta(N, Kd, dtype=dtype), _meta(N, dtype=dtype)
                    mask = _meta(M, (N + 7) // 8, dtype=torch.uint8) if slope < 0 else None
                    K.linear_leaky_relu(x, w, b, _meta(M, N, dtype=dtype), mask, slope)
                cases.append((f"linear_leaky_relu {M}x{Kd}->{N} {dtype} slope={slope}", thunk))
    return cases


def cases(kind: str = "report") -> list[tuple[str, Callable[[], None]]]:
    """Every launcher over a sweep: ``report`` (representative launch configurations: what CI compiles,
    bounded to a few minutes on 2 cores), ``full`` (more shapes and dtypes), ``large`` (shapes at the
    grid limits, for tests that run nothing). A label ending in "[aligned]" marks a case whose
    innermost sizes are multiples of 16 (streaming kernels must load vectors there)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if kind == "large":
        return (group_norm_cases([(70000, 64, 2, 2, 8, True), (100000, 64, 8, False), (70000, 32, 4, 4, 32, False),
                                  (100000, 16384, 2, False), (1, 64, 2048, 2048, 32, False)], [bf16], acts=("none",))
                + batch_norm_cases([(100000, 64, False), (70000, 64, 4, 4, True), (70000, 8, 4, 4, False),
                                    (4, 8, 4096, 4096, False)], [bf16], acts=("none",))
                + layer_norm_cases([(1 << 20, 64), (1 << 18, 4096), (300, 1 << 23), (3, 1 << 21), (1 << 16, 20000),
                                    (1, 1 << 28)],
                                   [bf16], ops=("layer_norm",))
                + attention_cases([(256, 32, 8, 4096, 4096, 128), (1, 64, 1, 8, 1 << 20, 128)], [bf16],
                                  variants=("plain",))
                + clip_cases([[1 << 31, 1000], [16] * 100000], [bf16])
                + bias_leaky_relu_cases([(1 << 26, 64, False), (1 << 16, 1 << 14, True)], [bf16], slopes=(-0.5,))
                + linear_cases([(1 << 20, 1024, 4096)], [bf16], slopes=(-0.5,)))
    full = kind == "full"
    out = []
    # GroupNorm: NCHW (channel tiles spread), channels_last (per-sample BatchNorm kernels), (N, C) rows, odd
    out += group_norm_cases([(1, 512, 64, 64, 32, False), (1, 512, 64, 64, 32, True), (8192, 512, 32, False),
                             (2, 96, 9, 7, 3, False)], [bf16], acts=("silu",))
    out += group_norm_cases([(1, 2048, 16, 16, 32, False)] + ([(8192, 512, 32, False)] if full else []), [fp32],
                            acts=("none",))
    # BatchNorm: NCHW, channels_last, (N, C)
    out += batch_norm_cases([(128, 256, 56, 56, False), (128, 256, 56, 56, True)]
                            + ([(131072, 1024, False)] if full else []), [bf16], acts=("relu",))
    out += batch_norm_cases([(128, 256, 56, 56, False), (131072, 1024, False)], [fp32], acts=("none",))
    # LayerNorm / RMSNorm / add + LayerNorm: whole rows from 64 to 16K, unaligned, few long rows
    ns = [64, 768, 4096, 4097, 8192, 16384, 32768, 65536] if full else [64, 4096, 4097, 8192, 16384, 32768]
    out += layer_norm_cases([(32768 if n <= 8192 else 4096, n) for n in ns] + [(32, 200000)], [bf16],
                            ops=("layer_norm",))
    out += layer_norm_cases([(32768, 8192), (32, 200000)], [bf16], ops=("add_layer_norm",))
    out += layer_norm_cases([(32768, 4096), (32, 200000)], [fp32], ops=("rms_norm",))
    # Attention: head dim 128 plain, causal, dropout; MQA backward at batch 1; a decode step (split-KV)
    attn = [(4, 16, 16, 2048, 2048, 128), (4, 16, 16, 2048, 2048, 64)]
    out += attention_cases(attn[:1], [bf16], variants=("plain", "causal", "dropout"))
    out += attention_cases([(1, 16, 1, 2048, 2048, 128)], [bf16], variants=("plain+bwd",))
    out += attention_cases([(4, 32, 8, 1, 8192, 128)], [bf16], variants=("plain+fwd",))
    if full:
        out += attention_cases(attn[1:], [bf16], variants=("plain", "causal", "dropout", "mask", "precise"))
        out += attention_cases(attn, [fp16, fp32], variants=("plain",))
    # Gradient clipping: aligned and unaligned tensor lists
    out += clip_cases([[4096 * 4096, 1 << 20, 4096, 4096 * 3], [1000003, 4097, 5]], [bf16, fp32])
    # bias + Leaky ReLU: per column and per row (NCHW), y saved or the sign mask
    out += bias_leaky_relu_cases([(32768, 4096, False), (64 * 128, 128 * 128, True)], [bf16])
    out += bias_leaky_relu_cases([(32768, 4096, False)], [fp32], slopes=(-0.5,))
    # Linear + Leaky ReLU: every autotune config, with the mask epilogue (both epilogues in full)
    out += linear_cases([(8192, 4096, 16384)], [bf16] + ([fp32] if full else []),
                        slopes=(0.01, -0.5) if full else (-0.5,))
    return out

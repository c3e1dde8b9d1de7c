"""The C++ CPU GroupNorm / BatchNorm kernels against eager torch on this machine's CPU, in one process.

    PYTHONPATH=$PWD python benchmarks/cpu_channel_norms.py [--reps 15] [--threads 1]

Cases (the issue's CPU shapes, fp32): GroupNorm 8x64x56x56, 32 groups, NCHW and channels_last, without
and with SiLU; BatchNorm2d training 32x64x56x56, NCHW and channels_last, without and with ReLU. Each
is timed forward and forward+backward, for
- ``fusedstab``: fusedstab.functional.group_norm / batch_norm with the fused activation on the ``cpu``
  backend, through autograd for forward+backward (what a user runs);
- ``kernels``: the fusedstab_C ops alone, called as the public op calls them (outputs allocated,
  statistics finished between the BatchNorm steps): the public path's overhead is the difference;
- ``eager``: F.group_norm / F.batch_norm (training, running statistics) then the eager activation
  (for "none": the norm alone), through autograd for forward+backward.
The script re-executes itself with OMP_WAIT_POLICY=passive (spinning OpenMP workers on a shared 2-core
machine make times jump in scheduler quanta) and with glibc's malloc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_): by default a 6 MB block freed at the top of the heap
is returned to the OS and the next call page-faults it back, which made eager's two-op GroupNorm + SiLU
(two 6 MB outputs) 10 ms instead of 2.4 ms, an artifact of the allocator rather than of either kernel.
The providers run interleaved, round after round, and each reports its median and its minimum: the
machine is shared and noisy, so only ratios within one run mean anything (on a loaded machine the
2-thread medians move in scheduler quanta of 4 ms; the minima, and 1-thread runs, are steadier). The copy bandwidth (a 256 MiB ``copy_``) is
measured the same way, and each case's bytes model gives the time a pass at that bandwidth implies.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fusedstab
from fusedstab import extension
from fusedstab import functional as FS

EPS = 1e-5


def timeit(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(providers: dict, reps: int, rounds: int = 5) -> dict:
    times = {k: [] for k in providers}
    for _ in range(rounds):
        for k, fn in providers.items():
            times[k] += timeit(fn, max(1, reps // rounds))
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def act_fn(name):
    return {"none": lambda t: t, "relu": F.relu, "silu": F.silu}[name]


def fs_act(name):
    return None if name == "none" else name


def gn_case(ops, fmt, act, reps):
    N, C, H, W, G = 8, 64, 56, 56, 32
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x4 = torch.randn(N, C, H, W).contiguous(memory_format=mf)
    dy4 = torch.randn(N, C, H, W).contiguous(memory_format=mf)
    w, b = 1 + 0.5 * torch.randn(C), 0.5 * torch.randn(C)
    x, dy = x4.flatten(2), dy4.flatten(2)

    def cpp_fwd():
        y, mean, rstd = torch.empty_like(x), x.new_empty(N, G), x.new_empty(N, G)
        ops.group_norm_fwd(x, w, b, G, EPS, act, 0.01, y, mean, rstd)
        return y, mean, rstd

    def cpp_fwd_bwd():
        y, mean, rstd = cpp_fwd()
        dx, dw, db = torch.empty_like(x), torch.empty(C), torch.empty(C)
        ops.group_norm_bwd(dy, x, w, b, mean, rstd, G, act, 0.01, dx, dw, db)

    f = act_fn(act)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x4, w, b))

    def eager_fwd():
        with torch.no_grad():
            return f(F.group_norm(x4, G, w, b, EPS))

    def eager_fwd_bwd():
        f(F.group_norm(xl, G, wl, bl, EPS)).backward(dy4)
        xl.grad = wl.grad = bl.grad = None

    def fs_fwd():
        with torch.no_grad():
            return FS.group_norm(x4, G, w, b, EPS, activation=fs_act(act))

    def fs_fwd_bwd():
        FS.group_norm(xl, G, wl, bl, EPS, activation=fs_act(act)).backward(dy4)
        xl.grad = wl.grad = bl.grad = None

    n = x.numel() * 4
    return dict(fwd=interleaved(dict(fusedstab=fs_fwd, kernels=cpp_fwd, eager=eager_fwd), reps),
                fwd_bwd=interleaved(dict(fusedstab=fs_fwd_bwd, kernels=cpp_fwd_bwd, eager=eager_fwd_bwd), reps),
                bytes=dict(fwd=2 * n, fwd_bwd=5 * n))


def bn_case(ops, fmt, act, reps):
    N, C, H, W = 32, 64, 56, 56
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x4 = torch.randn(N, C, H, W).contiguous(memory_format=mf)
    dy4 = torch.randn(N, C, H, W).contiguous(memory_format=mf)
    w, b = 1 + 0.5 * torch.randn(C), 0.5 * torch.randn(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    x, dy = x4.flatten(2), dy4.flatten(2)

    def cpp_fwd():
        stats = x.new_empty(3, C)
        ops.batch_norm_stats(x, stats)
        count, mean, m2 = stats
        rstd = torch.rsqrt(m2 / count + EPS)
        with torch.no_grad():  # the running statistics, as the public op updates them
            rm.lerp_(mean, 0.1)
            rv.lerp_(m2 / (count - 1), 0.1)
        y = torch.empty_like(x)
        ops.batch_norm_elemt(x, w, b, mean, rstd, act, 0.01, y)
        return y, count, mean, rstd

    def cpp_fwd_bwd():
        y, count, mean, rstd = cpp_fwd()
        sums = x.new_empty(2, C)
        ops.batch_norm_bwd_reduce(dy, x, w, b, mean, rstd, act, 0.01, sums)
        dx = torch.empty_like(x)
        ops.batch_norm_bwd_elemt(dy, x, w, b, mean, rstd, sums / count, act, 0.01, dx)

    f = act_fn(act)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x4, w, b))

    def eager_fwd():
        with torch.no_grad():
            return f(F.batch_norm(x4, rm, rv, w, b, True, 0.1, EPS))

    def eager_fwd_bwd():
        f(F.batch_norm(xl, rm, rv, wl, bl, True, 0.1, EPS)).backward(dy4)
        xl.grad = wl.grad = bl.grad = None

    def fs_fwd():
        with torch.no_grad():
            return FS.batch_norm(x4, rm, rv, w, b, True, 0.1, EPS, activation=fs_act(act))

    def fs_fwd_bwd():
        FS.batch_norm(xl, rm, rv, wl, bl, True, 0.1, EPS, activation=fs_act(act)).backward(dy4)
        xl.grad = wl.grad = bl.grad = None

    n = x.numel() * 4
    return dict(fwd=interleaved(dict(fusedstab=fs_fwd, kernels=cpp_fwd, eager=eager_fwd), reps),
                fwd_bwd=interleaved(dict(fusedstab=fs_fwd_bwd, kernels=cpp_fwd_bwd, eager=eager_fwd_bwd), reps),
                bytes=dict(fwd=2 * n, fwd_bwd=5 * n))


ENV = {"OMP_WAIT_POLICY": "passive", "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def main():
    if any(k not in os.environ for k in ENV):  # both are read when the libraries load: re-exec
        os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--only", choices=("gn", "bn"))
    p.add_argument("--threads", type=int)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    why = extension.load()
    assert why is None, why
    ops = torch.ops.fusedstab_C
    src, dst = torch.randn(64 << 20), torch.empty(64 << 20)
    copy = interleaved(dict(copy=lambda: dst.copy_(src)), a.reps)["copy"]
    bw = 2 * src.numel() * 4 / copy[0]
    print(f"threads {torch.get_num_threads()}; copy_ of 256 MiB: median {copy[0] * 1e3:.1f} ms = {bw / 1e9:.1f} GB/s, "
          f"min {copy[1] * 1e3:.1f} ms = {2 * src.numel() * 4 / copy[1] / 1e9:.1f} GB/s (read + write); times are "
          f"median / min in ms")
    print(f"{'case':44s} {'pass':>8s} {'model':>6s} {'fusedstab':>13s} {'kernels':>13s} {'eager':>13s} "
          f"{'eager/fusedstab':>15s}")
    cases = []
    if a.only in (None, "gn"):
        cases += [(f"group_norm 8x64x56x56 G32 {fmt} {act}", gn_case, fmt, act)
                  for fmt in ("nchw", "channels_last") for act in ("none", "silu")]
    if a.only in (None, "bn"):
        cases += [(f"batch_norm 32x64x56x56 train {fmt} {act}", bn_case, fmt, act)
                  for fmt in ("nchw", "channels_last") for act in ("none", "relu")]
    for name, fn, fmt, act in cases:
        with fusedstab.use_backend("cpu"):
            r = fn(ops, fmt, act, a.reps)
        for k in ("fwd", "fwd_bwd"):
            t = r[k]
            cell = lambda v: f"{v[0] * 1e3:6.2f}/{v[1] * 1e3:6.2f}"  # noqa: E731
            print(f"{name:44s} {k:>8s} {r['bytes'][k] / bw * 1e3:6.2f} {cell(t['fusedstab'])} {cell(t['kernels'])} "
                  f"{cell(t['eager'])} {t['eager'][0] / t['fusedstab'][0]:6.2f}x/{t['eager'][1] / t['fusedstab'][1]:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()

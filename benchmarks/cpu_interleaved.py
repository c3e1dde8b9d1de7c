"""The cpu backend against eager torch on CPU, timed interleaved in one process.

Each repetition runs every provider of a case once, in turn, so that a noisy machine (2 shared cores)
slows them alike; the medians over the repetitions are compared as ratios (eager / fusedstab: > 1 is
fusedstab faster). Providers: ``eager`` (torch's own op where it has one: F.layer_norm, F.rms_norm),
``unfused`` (the eager sequence the fused op replaces: x + r then the norm, x + b then F.leaky_relu,
F.linear then F.leaky_relu, torch.nn.utils.clip_grad_norm_), ``cpu`` (fusedstab under
use_backend("cpu")). Modes: ``fwd`` (inputs require grad, as in training) and ``fwd+bwd``.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 PYTHONPATH=. \
        python benchmarks/cpu_interleaved.py [--reps 21] [--threads 2] [--clock wall] [--only layer_norm ...]

Prints one line per case and mode: median ms per provider and the ratios, plus the copy bandwidth
(dst.copy_(src) of 256 MiB, read + write) measured at the start and the end of the run.

The malloc settings keep freed memory in the heap: without them glibc returns each large block to the
kernel and every call pays the page faults of its fresh outputs again (about 100 ms per 32 MiB on the
shared VM these notes were measured on, for both providers alike), which would drown the kernels.
``--clock thread`` (with ``--threads 1``) times the CPU time of the calling thread instead of the wall
clock: it does not count the time the thread waits for a core, so it stays meaningful on a machine
whose other tenants keep both cores busy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fusedstab
from fusedstab import functional as FS
from fusedstab.bench.clip_grad_norm import transformer
from fusedstab.utils import clip_grad_norm_ as fs_clip
from fusedstab.utils import get_total_norm as fs_total_norm

SLOPE = 0.01


def copy_bandwidth(mib: int = 256, reps: int = 15) -> float:
    src = torch.randn(mib << 18)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(ts) / 1e9


CLOCK = time.perf_counter


def timed(fn) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def training_thunk(fn, inputs, dy, mode):
    """fwd: fn(*inputs) with grad-requiring inputs; fwd+bwd: then backward(dy), grads dropped first."""
    def run():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        y = fn(*inputs)
        if mode == "fwd+bwd":
            y.backward(dy)
    return run


def norm_cases(dtype):
    M, N = 8192, 1024
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x, r, dy = rnd(M, N).requires_grad_(), rnd(M, N).requires_grad_(), rnd(M, N)
    w, b = rnd(N).requires_grad_(), rnd(N).requires_grad_()
    ns = (N,)
    yield f"layer_norm {M}x{N}", [x, w, b], dy, {
        "eager": lambda x, w, b: F.layer_norm(x, ns, w, b),
        "cpu": lambda x, w, b: FS.layer_norm(x, ns, w, b)}
    yield f"rms_norm {M}x{N}", [x, w], dy, {
        "eager": lambda x, w: F.rms_norm(x, ns, w),
        "cpu": lambda x, w: FS.rms_norm(x, ns, w)}
    # add + LayerNorm returns (y, h): the backward takes dy for y and none for h (a pre-norm block's
    # h does get a gradient; the fused op adds it to dx in the same pass).
    yield f"add_layer_norm {M}x{N}", [x, r, w, b], dy, {
        "unfused": lambda x, r, w, b: F.layer_norm(x + r, ns, w, b),
        "cpu": lambda x, r, w, b: FS.add_layer_norm(x, r, ns, w, b)[0]}


def bias_cases(dtype):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    for T, H in ((256, 4096), (1024, 4096), (64, 16384)):  # 4, 16, 4 MiB of fp32
        x, b, dy = rnd(T, H).requires_grad_(), rnd(H).requires_grad_(), rnd(T, H)
        yield f"bias_leaky_relu {T}x{H}", [x, b], dy, {
            "unfused": lambda x, b: F.leaky_relu(x + b, SLOPE),
            "cpu": lambda x, b: FS.bias_leaky_relu(x, b, SLOPE)}
    x, b, dy = rnd(8, 256, 28, 28).requires_grad_(), rnd(256).requires_grad_(), rnd(8, 256, 28, 28)
    yield "bias_leaky_relu 8x256x28x28 dim=1", [x, b], dy, {
        "unfused": lambda x, b: F.leaky_relu(x + b[:, None, None], SLOPE),
        "cpu": lambda x, b: FS.bias_leaky_relu(x, b, SLOPE, 1)}


def linear_cases(dtype):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    for M, K, N in ((1024, 512, 2048), (1024, 2048, 512), (256, 128, 512)):  # the harness's CPU shapes
        x, w, b, dy = rnd(M, K).requires_grad_(), (rnd(N, K) * K ** -0.5).requires_grad_(), \
            (rnd(N) * K ** -0.5).requires_grad_(), rnd(M, N)
        yield f"linear_leaky_relu {M}x{K}->{N}", [x, w, b], dy, {
            "unfused": lambda x, w, b: F.leaky_relu(F.linear(x, w, b), SLOPE),
            "cpu": lambda x, w, b: FS.linear_leaky_relu(x, w, b, SLOPE)}


def clip_cases(dtype):
    """GPT-2 small's 148 gradients (124M elements): get_total_norm, and clip_grad_norm_ (the norm,
    then the scaling) twice: with max_norm fixed, the gradients sit at the limit after the first call
    and the coefficient is then exactly 1 (fusedstab's scale writes nothing for t * 1, torch multiplies
    anyway), and with max_norm 1% lower every call, so that every call scales."""
    g = torch.Generator().manual_seed(0)
    shapes = transformer(50257, 1024, 768, 12)
    params = {k: [torch.nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes] for k in ("eager", "cpu")}
    for pe, pc in zip(params["eager"], params["cpu"]):
        pe.grad = torch.randn(pe.shape, generator=g, dtype=dtype)
        pc.grad = pe.grad.clone()
    pe, pc = params["eager"], params["cpu"]
    n = sum(p.numel() for p in pc)
    yield f"get_total_norm gpt2-small ({n / 1e6:.0f}M)", {
        "unfused": lambda: torch.nn.utils.get_total_norm([p.grad for p in pe], foreach=True),
        "cpu": lambda: fs_total_norm([p.grad for p in pc])}
    yield "clip_grad_norm_ gpt2-small, coef 1", {
        "unfused": lambda: torch.nn.utils.clip_grad_norm_(pe, 1.0, foreach=True),
        "cpu": lambda: fs_clip(pc, 1.0)}
    limit = {"unfused": [1.0], "cpu": [1.0]}

    def shrinking(fn, k):
        def run():
            limit[k][0] *= 0.99
            return fn(limit[k][0])
        return run
    yield "clip_grad_norm_ gpt2-small, coef < 1", {
        "unfused": shrinking(lambda m: torch.nn.utils.clip_grad_norm_(pe, m, foreach=True), "unfused"),
        "cpu": shrinking(lambda m: fs_clip(pc, m), "cpu")}


def run_case(name, fns, reps, mode=""):
    ts = {k: [] for k in fns}
    for k, f in fns.items():  # warm-up (and the one-time build of the extension)
        f()
    for _ in range(reps):
        for k, f in fns.items():
            ts[k].append(timed(f))
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    ratios = " ".join(f"{k}/cpu {med[k] / med['cpu']:.2f}x" for k in med if k != "cpu")
    cols = " ".join(f"{k} {v:8.2f}" for k, v in med.items())
    print(f"{name:42s} {mode:8s} {cols}   {ratios}", flush=True)
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--only", nargs="*", default=["layer_norm", "bias", "linear", "clip"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread measures the calling thread only: use it with --threads 1")
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"copy bandwidth {copy_bandwidth():.1f} GB/s (read + write)", flush=True)
    for dn in args.dtypes:
        dtype = getattr(torch, dn)
        print(f"--- {dn} (median ms)")
        groups = {"layer_norm": norm_cases, "bias": bias_cases, "linear": linear_cases}
        for key, make in groups.items():
            if key not in args.only:
                continue
            for name, inputs, dy, fns in make(dtype):
                for mode in ("fwd", "fwd+bwd"):
                    wrapped = {}
                    for k, f in fns.items():
                        th = training_thunk(f, inputs, dy, mode)
                        if k == "cpu":
                            th = (lambda th: lambda: _under_cpu(th))(th)
                        wrapped[k] = th
                    run_case(name, wrapped, args.reps, mode)
        if "clip" in args.only:
            for name, fns in clip_cases(dtype):
                fns = {k: ((lambda f: lambda: _under_cpu(f))(f) if k == "cpu" else f) for k, f in fns.items()}
                run_case(name, fns, max(5, args.reps // 2), "")
    print(f"copy bandwidth at the end {copy_bandwidth():.1f} GB/s", flush=True)


def _under_cpu(fn):
    with fusedstab.use_backend("cpu"):
        fn()


if __name__ == "__main__":
    main()

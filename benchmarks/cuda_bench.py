"""Kernel-level timing of the cuda backend beside triton and eager torch, as fractions of the
device-to-device copy bandwidth measured in the same run (benchmarks/NOTES.md, "CUDA kernels", has
the byte counts and the targets). Calls the ops directly (no autograd), bf16 unless said otherwise,
`triton.testing.do_bench` medians, inputs larger than L2.

    python benchmarks/cuda_bench.py [--out DIR] [--quick]

Writes cuda_kernels_<gpu>.json and .txt under --out (default benchmarks/results) and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fusedstab  # noqa: E402
from fusedstab import utils as FU  # noqa: E402

OPS = torch.ops.fusedstab
BF16 = torch.bfloat16


def bench(fn) -> float:
    """Median milliseconds."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
    n = 1 << 29
    a, b = torch.empty(n, dtype=BF16, device="cuda").normal_(), torch.empty(n, dtype=BF16, device="cuda")
    ms = bench(lambda: b.copy_(a))
    return 2 * n * 2 / (ms * 1e-3)


def on(backend, fn):
    def run():
        with fusedstab.use_backend(backend):
            fn()
    return run


def layer_norm_cases(quick):
    # 2^26 elements (128 MiB of bf16, past the H200's 60 MB L2); 32768 takes the long-row kernels
    shapes = [(65536, 1024), (16384, 4096), (2048, 32768)] if not quick else [(16384, 4096)]
    for (M, N) in shapes:
        x = torch.randn(M, N, device="cuda", dtype=BF16)
        r = torch.randn(M, N, device="cuda", dtype=BF16)
        w, b = torch.randn(N, device="cuda", dtype=BF16), torch.randn(N, device="cuda", dtype=BF16)
        dy = torch.randn(M, N, device="cuda", dtype=BF16)
        e = M * N * 2
        for rms in (False, True):
            name = "rms_norm" if rms else "layer_norm"
            bb = None if rms else b
            with fusedstab.use_backend("triton"):
                _, _, mean, rstd = OPS.layer_norm_fwd(x, w, bb, None, 1e-5, rms)
            eager_f = (lambda: torch.nn.functional.rms_norm(x, (N,), w, 1e-5)) if rms else (
                lambda: torch.nn.functional.layer_norm(x, (N,), w, b, 1e-5))
            yield (f"{name} fwd", f"{M}x{N}", 2 * e + 4 * N, {
                "cuda": on("cuda", lambda: OPS.layer_norm_fwd(x, w, bb, None, 1e-5, rms)),
                "triton": on("triton", lambda: OPS.layer_norm_fwd(x, w, bb, None, 1e-5, rms)),
                "eager": eager_f})
            yield (f"{name} bwd", f"{M}x{N}", 3 * e + 8 * N, {
                "cuda": on("cuda", lambda: OPS.layer_norm_bwd(dy, x, w, bb, mean, rstd, None, rms)),
                "triton": on("triton", lambda: OPS.layer_norm_bwd(dy, x, w, bb, mean, rstd, None, rms))})
        yield ("add_layer_norm fwd", f"{M}x{N}", 4 * e + 4 * N, {
            "cuda": on("cuda", lambda: OPS.layer_norm_fwd(x, w, b, r, 1e-5, False)),
            "triton": on("triton", lambda: OPS.layer_norm_fwd(x, w, b, r, 1e-5, False)),
            "eager": lambda: torch.nn.functional.layer_norm(x + r, (N,), w, b, 1e-5)})


def bias_leaky_relu_cases(quick):
    shapes = [((16384, 4096), False), ((256 * 64, 56 * 56), True)] if not quick else [((16384, 4096), False)]
    for (R, L), per_row in shapes:
        x = torch.randn(R, L, device="cuda", dtype=BF16)
        C = 64 if per_row else L
        b = torch.randn(C, device="cuda", dtype=BF16)
        e = R * L * 2
        with fusedstab.use_backend("triton"):
            y, _ = OPS.bias_leaky_relu_fwd(x, b, 0.01, per_row)
        eager_b = b.repeat(R // C)[:, None] if per_row else b
        yield ("bias_leaky_relu fwd", f"{R}x{L}{' per-row' if per_row else ''}", 2 * e, {
            "cuda": on("cuda", lambda: OPS.bias_leaky_relu_fwd(x, b, 0.01, per_row)),
            "triton": on("triton", lambda: OPS.bias_leaky_relu_fwd(x, b, 0.01, per_row)),
            "eager": lambda: torch.nn.functional.leaky_relu(x + eager_b, 0.01)})
        args = (x, y, 0.01, per_row, C, BF16, True, True)
        yield ("bias_leaky_relu bwd", f"{R}x{L}{' per-row' if per_row else ''}", 3 * e, {
            "cuda": on("cuda", lambda: OPS.bias_leaky_relu_bwd(*args)),
            "triton": on("triton", lambda: OPS.bias_leaky_relu_bwd(*args))})


def group_norm_cases(quick):
    """GroupNorm (32 groups, SiLU fused) forward and backward, NCHW and channels_last: a batch of UNet
    maps past L2, and batch 1 (a diffusion sampler's shape, L2-resident on an H100). Bytes: the
    minimum (forward x + y, backward x + dy + dx); the two-pass kernels read x once more forward and
    x, dy once more backward (benchmarks/NOTES.md)."""
    shapes = [(32, 320, 64, 64), (1, 512, 128, 128)] if not quick else [(32, 320, 64, 64)]
    for shape in shapes:
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(shape, device="cuda", dtype=BF16).contiguous(memory_format=fmt)
            dy = torch.randn(shape, device="cuda", dtype=BF16).contiguous(memory_format=fmt)
            C = shape[1]
            w, b = torch.rand(C, device="cuda", dtype=BF16) + 0.5, torch.randn(C, device="cuda", dtype=BF16)
            e = x.numel() * 2
            with fusedstab.use_backend("triton"):
                _, mean, rstd = OPS.group_norm_fwd(x, w, b, 32, 1e-5, "silu", 0.01)
            name = "x".join(map(str, shape)) + (" cl" if cl else "")
            yield ("group_norm fwd", name, 2 * e + 4 * C, {
                "cuda": on("cuda", lambda: OPS.group_norm_fwd(x, w, b, 32, 1e-5, "silu", 0.01)),
                "triton": on("triton", lambda: OPS.group_norm_fwd(x, w, b, 32, 1e-5, "silu", 0.01)),
                "eager": lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b, 1e-5))})
            yield ("group_norm bwd", name, 3 * e + 12 * C, {
                "cuda": on("cuda", lambda: OPS.group_norm_bwd(dy, x, w, b, mean, rstd, 32, "silu", 0.01)),
                "triton": on("triton", lambda: OPS.group_norm_bwd(dy, x, w, b, mean, rstd, 32, "silu", 0.01))})


def batch_norm_cases(quick):
    """BatchNorm's four steps (ReLU fused), NCHW and channels_last, a ResNet stage past L2; and the
    training forward as the public function runs it (statistics, running-stat update, normalize)
    beside eager torch. Bytes: the minimum of each step (stats x; elemt x + y; bwd_reduce x + dy;
    bwd_elemt x + dy + dx; the training forward x twice + y)."""
    shapes = [(64, 256, 56, 56)] if not quick else [(32, 256, 56, 56)]
    for shape in shapes:
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(shape, device="cuda", dtype=BF16).contiguous(memory_format=fmt)
            dy = torch.randn(shape, device="cuda", dtype=BF16).contiguous(memory_format=fmt)
            C = shape[1]
            w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")  # fp32, as nn.BatchNorm2d under autocast
            rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
            e = x.numel() * 2
            with fusedstab.use_backend("triton"):
                count, mean, m2 = OPS.batch_norm_stats(x)
                rstd = torch.rsqrt(m2 / count + 1e-5)
                coef = OPS.batch_norm_bwd_reduce(dy, x, w, b, mean, rstd, "relu", 0.01) / count
            name = "x".join(map(str, shape)) + (" cl" if cl else "")
            steps = [("stats", e, lambda: OPS.batch_norm_stats(x)),
                     ("elemt", 2 * e, lambda: OPS.batch_norm_elemt(x, w, b, mean, rstd, "relu", 0.01)),
                     ("bwd_reduce", 2 * e, lambda: OPS.batch_norm_bwd_reduce(dy, x, w, b, mean, rstd, "relu", 0.01)),
                     ("bwd_elemt", 3 * e, lambda: OPS.batch_norm_bwd_elemt(dy, x, w, b, mean, rstd, coef, "relu", 0.01))]
            for step, nbytes, fn in steps:
                yield (f"batch_norm {step}", name, nbytes, {"cuda": on("cuda", fn), "triton": on("triton", fn)})
            fwd = lambda: fusedstab.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, "relu")  # noqa: E731
            yield ("batch_norm fwd train", name, 3 * e, {
                "cuda": on("cuda", fwd), "triton": on("triton", fwd),
                "eager": lambda: torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))})


def _params(sizes, dtype=torch.float32):
    ps = []
    for s in sizes:
        p = torch.zeros(s, device="cuda", dtype=dtype, requires_grad=True)
        p.grad = torch.randn(s, device="cuda", dtype=dtype)
        ps.append(p)
    return ps


def gpt2_small_sizes():
    d, v, L = 768, 50257, 12
    sizes = [v * d, 1024 * d]
    for _ in range(L):
        sizes += [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
    return sizes + [d, d]


def clip_cases(quick):
    lists = [("GPT-2 small (148 fp32)", gpt2_small_sizes()), ("1000 x 100K fp32", [100_000] * 1000)]
    if not quick:
        lists.append(("1B fp32 (8 x 125M)", [125_000_000] * 8))
    for name, sizes in lists:
        ps = _params(sizes)
        grads = [p.grad for p in ps]
        e = sum(sizes) * 4
        yield ("clip norm pass", name, e, {
            "cuda": on("cuda", lambda: FU.get_total_norm(grads)),
            "triton": on("triton", lambda: FU.get_total_norm(grads)),
            "eager": lambda: torch.nn.utils.get_total_norm(grads, foreach=True)})
        yield ("clip_grad_norm_", name, 3 * e, {
            "cuda": on("cuda", lambda: FU.clip_grad_norm_(ps, 1.0)),
            "triton": on("triton", lambda: FU.clip_grad_norm_(ps, 1.0)),
            "eager": lambda: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)})
        ps = grads = None  # the timings ran: free the list before the next one
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_bench: no CUDA GPU")
        return 3
    why = fusedstab.backend.unavailable("cuda", "cuda")
    if why:
        print(f"cuda_bench: the cuda backend is unavailable: {why}")
        return 1
    bw = copy_bandwidth()
    rows = []
    for gen in (layer_norm_cases, bias_leaky_relu_cases, group_norm_cases, batch_norm_cases, clip_cases):
        for op, shape, nbytes, provs in gen(args.quick):
            row = {"op": op, "shape": shape, "bytes": nbytes}
            for name, fn in provs.items():
                try:
                    ms = bench(fn)
                    row[name] = {"ms": ms, "frac_copy_bw": nbytes / (ms * 1e-3) / bw}
                except Exception as e:  # one failing provider must not stop the table
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(row)
            print(_line(row), flush=True)
    dev = torch.cuda.get_device_name()
    import triton
    meta = {"device": dev, "copy_bandwidth_Bps": bw, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cuda_kernels_{re.sub(r'[^A-Za-z0-9]+', '_', dev).strip('_')}"
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    table = _table(meta)
    stem.with_suffix(".txt").write_text(table)
    print(table)
    print(f"wrote: {stem.with_suffix('.json')} {stem.with_suffix('.txt')}")
    return 0


def _cell(r):
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    return f"{r['ms'] * 1e3:8.1f} us {100 * r['frac_copy_bw']:5.1f}%"


def _line(row):
    return f"{row['op']:<20} {row['shape']:<24} " + " | ".join(
        f"{p} {_cell(row.get(p))}" for p in ("cuda", "triton", "eager"))


def _table(meta):
    head = (f"{meta['device']}: copy {meta['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write), torch "
            f"{meta['torch']}, triton {meta['triton']}, {meta['date']}\n"
            "time (median) and fraction of the copy bandwidth; cuda/triton: > 1 means cuda is faster\n")
    lines = [head]
    for row in meta["rows"]:
        c, t = row.get("cuda", {}), row.get("triton", {})
        ratio = f"{t['ms'] / c['ms']:.2f}" if "ms" in c and "ms" in t else "-"
        lines.append(_line(row) + f" | triton/cuda time {ratio}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Smoke test of every op on every backend, fp32 / fp16 / bf16, forward and backward: the first stage
of benchmarks/gpu_run.sh (a crash or a wrong result here makes every later number meaningless).

Each (op, backend, dtype) runs the public function (fusedstab.functional / fusedstab.utils) on a
small input under ``fusedstab.use_backend(backend)``, then backward, and compares the output and the
input gradients with torch's own ops in fp32 (loose, dtype-aware tolerances: this catches crashes,
NaN and wrong kernels, not the last bit; the GPU tests check the numerics). Every case is reported,
none stops the others. Writes smoke.json and smoke.txt to --out; exit 1 if anything failed.

    python benchmarks/gpu_smoke.py --out DIR               # on the GPU (device cuda)
    python benchmarks/gpu_smoke.py --out DIR --tiny        # CPU rehearsal: the interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cases(tiny: bool):
    """(name, fn(fs, dtype, device) -> (outputs, inputs needing grad), reference fn(torch, same inputs))."""
    import torch
    import torch.nn.functional as F

    import fusedstab.functional as FF

    n = 64 if tiny else 4096
    rows = 4 if tiny else 1024

    def norms(kind):
        def make(dtype, device):
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(rows, n, generator=g).to(device, dtype).requires_grad_()
            r = torch.randn(rows, n, generator=g).to(device, dtype).requires_grad_()
            w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_()
            b = (0.1 * torch.randn(n, generator=g)).to(device, dtype).requires_grad_()
            if kind == "layer_norm":
                return (x, w, b), lambda x, w, b: FF.layer_norm(x, (n,), w, b), \
                    lambda x, w, b: F.layer_norm(x, (n,), w, b)
            if kind == "rms_norm":
                return (x, w), lambda x, w: FF.rms_norm(x, (n,), w), lambda x, w: F.rms_norm(x, (n,), w)
            return (x, r, w, b), lambda x, r, w, b: FF.add_layer_norm(x, r, (n,), w, b)[0], \
                lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b)
        return make

    def group_norm(layout):
        def make(dtype, device):
            shape = {"nchw": (2, 32, 8, 8), "cl": (2, 32, 8, 8), "2d": (rows, 64)}[layout]
            x = torch.randn(shape).to(device, dtype)
            if layout == "cl":
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            w = torch.randn(shape[1]).to(device, dtype).requires_grad_()
            b = torch.randn(shape[1]).to(device, dtype).requires_grad_()
            return (x, w, b), lambda x, w, b: FF.group_norm(x, 8, w, b, activation="silu"), \
                lambda x, w, b: F.silu(F.group_norm(x, 8, w, b))
        return make

    def batch_norm(layout):
        def make(dtype, device):
            shape = (8, 16, 6, 6) if layout != "2d" else (rows, 32)
            x = torch.randn(shape).to(device, dtype)
            if layout == "cl":
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            w = torch.randn(shape[1]).to(device, dtype).requires_grad_()
            b = torch.randn(shape[1]).to(device, dtype).requires_grad_()
            stats = lambda: (torch.zeros(shape[1], device=device, dtype=dtype),  # noqa: E731
                             torch.ones(shape[1], device=device, dtype=dtype))
            return (x, w, b), lambda x, w, b: FF.batch_norm(x, *stats(), w, b, True, activation="relu"), \
                lambda x, w, b: F.relu(F.batch_norm(x, *stats(), w, b, True))
        return make

    def bias_leaky_relu(slope):
        def make(dtype, device):
            x = torch.randn(rows, n).to(device, dtype).requires_grad_()
            b = torch.randn(n).to(device, dtype).requires_grad_()
            return (x, b), lambda x, b: FF.bias_leaky_relu(x, b, slope), lambda x, b: F.leaky_relu(x + b, slope)
        return make

    def linear_leaky_relu(slope):
        def make(dtype, device):
            m, k, o = (16, 32, 48) if tiny else (512, 1024, 2048)
            x = torch.randn(m, k).to(device, dtype).requires_grad_()
            w = (torch.randn(o, k) / k ** 0.5).to(device, dtype).requires_grad_()
            b = torch.randn(o).to(device, dtype).requires_grad_()
            return (x, w, b), lambda x, w, b: FF.linear_leaky_relu(x, w, b, slope), \
                lambda x, w, b: F.leaky_relu(F.linear(x, w, b), slope)
        return make

    def attention(kind):
        def make(dtype, device):
            B, H, Hkv, L, S, E = (1, 2, 1 if kind == "gqa" else 2, 16, 16, 16) if tiny else \
                (2, 8, 2 if kind == "gqa" else 8, 1 if kind == "decode" else 512, 512, 64)
            q = torch.randn(B, H, L, E).to(device, dtype).requires_grad_()
            k = torch.randn(B, Hkv, S, E).to(device, dtype).requires_grad_()
            v = torch.randn(B, Hkv, S, E).to(device, dtype).requires_grad_()
            causal, gqa = kind == "causal", Hkv != H
            return (q, k, v), \
                lambda q, k, v: FF.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), \
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return make

    def clip(dtype, device):
        import fusedstab.utils as FU

        def run(*grads):
            ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
            for p, g in zip(ps, grads):
                p.grad = g.detach().clone()
            total = FU.clip_grad_norm_(ps, 1.0)
            return torch.cat([total.reshape(1).to(ps[0].grad.dtype)] + [p.grad.reshape(-1) for p in ps])

        def ref(*grads):
            ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
            for p, g in zip(ps, grads):
                p.grad = g.detach().clone()
            total = torch.nn.utils.clip_grad_norm_(ps, 1.0)
            return torch.cat([total.reshape(1).to(ps[0].grad.dtype)] + [p.grad.reshape(-1) for p in ps])

        grads = tuple(torch.randn(s).to(device, dtype) for s in ((n, 3), (17,), (5, 7)))
        return grads, run, ref

    return [
        ("layer_norm", norms("layer_norm")), ("rms_norm", norms("rms_norm")),
        ("add_layer_norm", norms("add_layer_norm")),
        ("group_norm_nchw", group_norm("nchw")), ("group_norm_cl", group_norm("cl")), ("group_norm_2d", group_norm("2d")),
        ("batch_norm_nchw", batch_norm("nchw")), ("batch_norm_cl", batch_norm("cl")), ("batch_norm_2d", batch_norm("2d")),
        ("bias_leaky_relu", bias_leaky_relu(0.01)), ("bias_leaky_relu_neg_slope", bias_leaky_relu(-0.5)),
        ("linear_leaky_relu", linear_leaky_relu(0.01)), ("linear_leaky_relu_neg_slope", linear_leaky_relu(-0.5)),
        ("attention", attention("plain")), ("attention_causal", attention("causal")), ("attention_gqa", attention("gqa")),
        ("attention_decode", attention("decode")),
        ("clip_grad_norm", clip),
    ]


TOL = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 6e-2}  # max |got - want| / max(1, max |want|)


def _run_one(make, backend, dtype, device):
    import torch

    import fusedstab

    inputs, fn, ref = make(dtype, device)
    with fusedstab.use_backend(backend):
        out = fn(*inputs)
        grads = []
        if out.requires_grad:
            dy = torch.randn_like(out)
            grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], dy, allow_unused=True)
    ref_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    want = ref(*ref_inputs)
    want_grads = []
    if grads:
        want_grads = torch.autograd.grad(want, [t for t in ref_inputs if t.requires_grad], dy.float(), allow_unused=True)
    worst = 0.0
    for got, exp in [(out, want)] + list(zip(grads, want_grads)):
        if got is None or exp is None:
            continue
        got, exp = got.detach().float(), exp.detach().float()
        if not torch.isfinite(got).all():
            raise AssertionError("non-finite values")
        worst = max(worst, ((got - exp).abs().max() / exp.abs().max().clamp_min(1.0)).item())
    if worst > TOL[str(dtype).split(".")[-1]]:
        raise AssertionError(f"error {worst:.2e} over {TOL[str(dtype).split('.')[-1]]:.0e}")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-smoke"))
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: the Triton interpreter, tiny shapes")
    p.add_argument("--ops", nargs="+", help="only cases whose name starts with one of these")
    a = p.parse_args(argv)
    if a.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    import fusedstab

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    backends = sorted(fusedstab.available_backends())
    unavailable = getattr(fusedstab.backend, "unavailable", None)  # (name, device) -> reason or None
    if unavailable is not None:  # e.g. the C++ cpu backend on CUDA tensors: not a failure, not a case
        backends = [b for b in backends if unavailable(b, device) is None]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if device == "cpu":  # the interpreter: bf16 loads are unreliable there (DESIGN.md)
        dtypes = [torch.float32, torch.float16] if not a.tiny else [torch.float32]
    a.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for name, make in _cases(a.tiny):
        if a.ops and not any(name.startswith(o) for o in a.ops):
            continue
        for backend in backends:
            for dtype in dtypes:
                t = time.perf_counter()
                try:
                    err = _run_one(make, backend, dtype, device)
                    status, detail = "ok", f"{err:.1e}"
                except Exception as e:  # noqa: BLE001: every case is reported
                    msg = str(e).strip().splitlines()
                    status, detail = "FAIL", f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]
                    if os.environ.get("SMOKE_TRACEBACK"):
                        traceback.print_exc()
                rows.append(dict(op=name, backend=backend, dtype=str(dtype).split(".")[-1], status=status,
                                 detail=detail, seconds=round(time.perf_counter() - t, 3)))
                print(f"{status:4s} {name:28s} {backend:7s} {rows[-1]['dtype']:9s} {detail}", flush=True)
    failed = [r for r in rows if r["status"] != "ok"]
    meta = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__,
                backends=backends, seconds=round(time.perf_counter() - t0, 1), failed=len(failed), total=len(rows))
    (a.out / "smoke.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"smoke: {len(rows) - len(failed)}/{len(rows)} ok on {meta['device']} ({meta['seconds']} s)"]
    lines += [f"  FAIL {r['op']} {r['backend']} {r['dtype']}: {r['detail']}" for r in failed]
    (a.out / "smoke.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run cases: every provider x mode, timed, checked against eager, turned into result rows."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import warnings

import torch

from . import load_cases
from .case import Case, Config
from .timing import as_tuple, copy_bandwidth, make_thunk, time_ms

# Max relative error vs eager (max |a-b| / max |b| per tensor) above which a row is flagged.
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def run(cfg: Config, ops: list[str], modes=None, only=None, log=print) -> dict:
    """Time every case of ``ops``; ``only``: provider names to keep; ``log``: progress lines."""
    copy = copy_bandwidth(cfg.device, 8 if cfg.smoke else 64 if cfg.device == "cpu" else 1024)
    log(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['buffer_mib']} MiB buffer)")
    cases, notes = [], {}
    for op in ops:
        try:
            cases += load_cases(op, cfg)
        except Exception as e:  # one broken op module must not stop the others
            notes[f"{op}: cases failed: {type(e).__name__}: {e}"] = None
    plan = [(c, [m for m in c.modes if not modes or m in modes],
             [p for p in c.providers if not only or p in only or p == "eager"]) for c in cases]
    serves = lambda case, name, mode: case.providers[name].modes is None or mode in case.providers[name].modes
    total = sum(serves(c, p, m) for c, ms, ps in plan for m in ms for p in ps)
    i, rows = 0, []
    for case, case_modes, names in plan:
        if "compile" in names:
            torch._dynamo.reset()  # fresh cache per shape: never hit the recompile limit and fall back
        for mode in case_modes:
            ref = None  # eager runs first in each (case, mode) and is the reference
            for name in (n for n in names if serves(case, n, mode)):
                i += 1
                prefix = f"[{i}/{total}] {case.label} {mode} {name}:"
                try:
                    row, out = _measure(case, mode, name, cfg, ref)
                except Exception as e:  # e.g. compile without a compiler, a peer's signature, OOM
                    msg = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]
                    notes[f"{name} {mode} {case.label}: failed: {msg}"] = None
                    log(f"{prefix} FAILED {msg}")
                    if cfg.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                ref = out if name == "eager" else ref
                row["gbps"] = row["bytes"] / row["ms"] / 1e6
                row["pct_copy"] = 100 * row["gbps"] / copy["gbps"]
                rows.append(row)
                err = row["max_rel_err"]
                if err is not None and err > TOL[cfg.dtype]:
                    notes[f"{name} {mode} {case.label}: output differs from eager "
                          f"(max rel err {err:.2e} > {TOL[cfg.dtype]:.0e})"] = None
                log(f"{prefix} {row['ms']:.4f} ms {row['gbps']:.1f} GB/s ({row['pct_copy']:.0f}% of copy)"
                    + ("" if err is None else f" err {err:.1e}")
                    + (f" {row['launches']} launches" if row.get("launches") is not None else "")
                    + (f" {row['syncs']} syncs" if row.get("syncs") else ""))
    _speedups(rows)
    if cfg.device == "cpu":
        notes["CPU: these inputs fit in cache, so % of copy bandwidth (out of cache) can pass 100"] = None
    for c in cases:
        for prov, why in c.skipped.items():
            notes[f"{prov}: {why}"] = None
    return {"schema": 1, "meta": environment(cfg), "copy_bandwidth": copy, "rows": rows,
            "notes": list(notes)}


def _measure(case: Case, mode: str, name: str, cfg: Config, ref):
    prov = case.providers[name]
    with prov.context():  # around building, the first call and timing: backward dispatches too
        inputs, grads = case.make_inputs()
        thunk = (case.thunk or make_thunk)(prov.fn, inputs, grads, mode)
        out = as_tuple(thunk())  # first call: compiles, and its result is checked against eager
        err = None if ref is None or not prov.check else _rel_err(out, ref)
        ms = time_ms(thunk, cfg.device, quick=cfg.quick or cfg.smoke)
        work = launches_and_syncs(thunk) if case.count_launches and cfg.device == "cuda" else None
    row = {"op": case.op, "case": case.label, "mode": mode, "provider": name, **case.params, "ms": ms,
           "bytes": case.bytes_moved[mode], "max_rel_err": err}
    if work is not None:
        row["launches"], row["syncs"] = work
    if case.flops:
        row["tflops"] = case.flops[mode] / ms / 1e9
    return row, out


def launches_and_syncs(thunk) -> tuple[int | None, int]:
    """Device work items (kernels, memcpys, memsets) one warm call of ``thunk`` puts on the GPU, by
    the profiler (None where it cannot tell), and the host syncs it makes (sync debug warnings)."""
    torch.cuda.synchronize()
    launches = None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            thunk()
            torch.cuda.synchronize()
        launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # no CUPTI, or a profiler that can't run here
        pass
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            thunk()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return launches, sum("synchroniz" in str(w.message) for w in seen)


def _rel_err(out, ref) -> float:
    if len(out) != len(ref):
        return float("inf")
    err = 0.0
    for a, b in zip(out, ref):
        a, b = a.detach().float(), b.detach().float()
        err = max(err, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return err


def _speedups(rows: list[dict]) -> None:
    key = lambda r: (r["case"], r["mode"])
    base = {(key(r), r["provider"]): r["ms"] for r in rows if r["provider"] in ("eager", "compile")}
    for r in rows:
        for b in ("eager", "compile"):
            t = base.get((key(r), b))
            r[f"speedup_vs_{b}"] = None if t is None else t / r["ms"]


def environment(cfg: Config) -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cfg.device, "device_name": device_name(cfg.device),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "python": platform.python_version(), "torch": torch.__version__, "triton": version("triton") or version("pytorch-triton"),
        "liger_kernel": version("liger-kernel"), "platform": platform.platform(),
        "argv": sys.argv[1:], "quick": cfg.quick, "smoke": cfg.smoke,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "torch_threads": torch.get_num_threads(),
        "git_commit": _cmd(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"])),
    }
    if cfg.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta["cuda"] = {
            "torch_cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_bytes": getattr(p, "L2_cache_size", None),
            "driver": _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        }
    return meta


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _cmd(argv) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

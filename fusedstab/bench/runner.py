"""Run cases: every provider x mode, timed, checked against eager, turned into result rows."""
from __future__ import annotations

import datetime
import importlib.metadata
import io
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

from . import OPS, load_cases
from .case import Case, Config, dtype_name
from .progress import Progress, duration
from .providers import about, backends
from .timing import as_tuple, copy_bandwidth, make_thunk, matmul_peak, once_ms, time_ms

SCHEMA = 2  # 2: rows carry "desc" (and "pct_matmul"); providers, backends, ops, matmul_peak; meta "tiny"

# Max relative error vs eager (max |a-b| / max |b| per tensor) above which a row is flagged.
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# Seconds per timed row (quick, full) and per torch.compile warm-up, for the estimate in the run's
# first line and the ETA before rows have been timed. CPU: measured with the quick set as CPU time
# (user + sys: the wall-clock time of 2 idle cores, as a run at load 1.5 showed) on a 2-core AMD
# EPYC, torch 2.13: 246 rows without compile in 7.5 s; 111 compile warm-ups 0.15 s each with a warm
# cache, 1.7 s cold. GPU: not measured yet, a guess from do_bench's warm-up + reps (quick: 50 ms,
# full: 125 ms) and inductor + Triton compile times.
ROW_S = {"cpu": (0.03, 0.06), "cuda": (0.2, 0.35)}
TINY_ROW_S = {"cpu": 0.02, "cuda": 0.2}  # one call per row (the Triton interpreter's: seconds)
COMPILE_S = {"cpu": {"warm": 0.15, "cold": 1.8}, "cuda": {"warm": 2.0, "cold": 15.0}}
SETUP_S = 5.0  # python, torch and fusedstab imports (twice on CPU: OMP_WAIT_POLICY), the yardsticks


def estimate(cfg: Config, rows: int, compile_rows: int) -> dict:
    """Seconds the timing will take, with a warm and a cold torch.compile cache."""
    row = TINY_ROW_S[cfg.device] if cfg.tiny else ROW_S[cfg.device][0 if cfg.quick else 1]
    plain = rows * row
    c = COMPILE_S[cfg.device]
    return {"warm": plain + compile_rows * c["warm"], "cold": plain + compile_rows * c["cold"]}


def run(cfg: Config, ops: list[str], modes=None, only=None, log=print, progress: Progress | None = None,
        extra_s: float = 0.0) -> dict:
    """Time every case of ``ops``; ``only``: provider names to keep; ``log``: a line of text;
    ``progress``: the bar and ETA (a silent one when None); ``extra_s``: seconds the caller adds
    after the timing (the figures), for the estimate in the first line."""
    if progress is None:
        progress = Progress(stream=io.StringIO(), tty=False)
        try:
            return run(cfg, ops, modes, only, log, progress, extra_s)
        finally:
            progress.close()
    t_start, prog = time.monotonic(), progress
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
    n_compile = sum(serves(c, "compile", m) for c, ms, ps in plan if "compile" in ps for m in ms)
    est = {k: v + extra_s + SETUP_S for k, v in estimate(cfg, total, n_compile).items()}
    what = "tiny set: checks that every provider runs, times nothing" if cfg.tiny else \
        "quick set" if cfg.quick else "full sweep"
    when = (f"about {duration(est['warm'])}" if not n_compile else
            f"about {duration(est['warm'])} with a warm torch.compile cache, {duration(est['cold'])} cold "
            f"(the first run on a machine compiles {n_compile} graphs)")
    log(f"fusedstab.bench: {total} timings of {len(ops)} ops on {cfg.device} ({dtype_name(cfg.dtype)}, {what}): "
        f"{when}" + ("; estimated for 2 idle CPU cores" if cfg.device == "cpu" else "; a rough estimate"))
    prog.prior = {True: COMPILE_S[cfg.device]["cold"], False: estimate(cfg, 1, 0)["warm"]}
    prog.plan(n_compile, total - n_compile)

    log("measuring the copy bandwidth and a matmul (the yardsticks) ...")
    copy = copy_bandwidth(cfg.device, 8 if cfg.tiny else 64 if cfg.device == "cpu" else 1024)
    peak = None
    if any(c.flops for c in cases):
        peak = matmul_peak(cfg.device, cfg.dtype, 256 if cfg.tiny else 1024 if cfg.device == "cpu" else 8192)
    log(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['buffer_mib']} MiB buffer, read + write)"
        + (f"; matmul {peak['n']}^3 {peak['dtype']}: {peak['tflops']:.3g} TFLOP/s" if peak else ""))

    rows, i, warned, unimplemented = [], 0, False, set()
    for case, case_modes, names in plan:
        if "compile" in names:
            torch._dynamo.reset()  # fresh cache per shape: never hit the recompile limit and fall back
        for mode in case_modes:
            ref = None  # eager runs first in each (case, mode) and is the reference
            for name in (n for n in names if serves(case, n, mode)):
                i += 1
                prefix = f"[{i}/{total}] {case.title} {mode} {name}:"
                slow = name == "compile"
                if slow:
                    log(f"torch.compile warm-up: {case.title} {mode}" + ("" if warned else
                        " (seconds per graph on a cold cache, then cached on disk for the next run)"))
                    warned = True
                prog.begin(f"{case.title} {mode} {name}", slow)
                try:
                    row, out = _measure(case, mode, name, cfg, ref)
                except Exception as e:  # e.g. compile without a compiler, a peer's signature, OOM
                    msg = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]
                    if type(e).__name__ == "BackendError" and "no implementation" in str(e):
                        # a fusedstab backend that does not have this op (yet): not a failure
                        notes[f"{name}: no implementation of {case.op} on this backend"] = None
                        unimplemented.add(name)
                        prog.end(f"{prefix} skipped: {msg}")
                        continue
                    notes[f"{name} {mode} {case.label}: failed: {msg}"] = None
                    prog.end(f"{prefix} FAILED {msg}")
                    if cfg.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                ref = out if name == "eager" else ref
                row["gbps"] = row["bytes"] / row["ms"] / 1e6
                row["pct_copy"] = 100 * row["gbps"] / copy["gbps"]
                if peak and row.get("tflops") is not None:
                    row["pct_matmul"] = 100 * row["tflops"] / peak["tflops"]
                rows.append(row)
                err = row["max_rel_err"]
                if err is not None and err > TOL[cfg.dtype]:
                    notes[f"{name} {mode} {case.label}: output differs from eager "
                          f"(max rel err {err:.2e} > {TOL[cfg.dtype]:.0e})"] = None
                rate = (f"{row['tflops']:.3g} TFLOP/s" if row.get("tflops") is not None else
                        f"{row['gbps']:.1f} GB/s ({row['pct_copy']:.0f}% of copy)")
                prog.end(f"{prefix} {row['ms']:.4f} ms {rate}"
                         + ("" if err is None else f" err {err:.1e}")
                         + (f" {row['launches']} launches" if row.get("launches") is not None else "")
                         + (f" {row['syncs']} syncs" if row.get("syncs") else ""))
    return result(cfg, cases, plan, rows, notes, copy, peak, only, unimplemented=unimplemented,
                  elapsed_s=time.monotonic() - t_start, estimate_s=est)


def result(cfg: Config, cases: list[Case], plan: list, rows: list[dict], notes: dict, copy: dict,
           peak: dict | None, only=None, unimplemented: set = frozenset(), elapsed_s: float | None = None,
           estimate_s: dict | None = None) -> dict:
    """The run's result, as JSON and the reports take it (``SCHEMA``): meta (machine, versions, date,
    options), the yardsticks, what each provider is, the fusedstab backends (ran or why not), the ops
    and cases (shapes in users' units, plot positions), the rows, the notes."""
    _speedups(rows)
    notes = dict(notes)
    if cfg.tiny:
        notes["--tiny: each time is one cold call: it checks that the provider runs, nothing more"] = None
    if cfg.device == "cpu" and not cfg.tiny:
        notes["CPU: these inputs fit in cache, so % of copy bandwidth (out of cache) can pass 100"] = None
    for c in cases:
        for prov, why in c.skipped.items():
            notes[f"{prov}: {why}"] = None
    planned = {p for _, _, ps in plan for p in ps}
    ran = {r["provider"] for r in rows}
    provs = list(dict.fromkeys([p for _, _, ps in plan for p in ps] + [r["provider"] for r in rows]))
    ops = list(dict.fromkeys(c.op for c in cases))
    return {"schema": SCHEMA, "meta": environment(cfg), "copy_bandwidth": copy, "matmul_peak": peak,
            "providers": {p: about(p) for p in provs},
            "backends": backends(cfg.device, planned, ran, only, unimplemented),
            "ops": {op: {k: v for k, v in OPS[op]._asdict().items() if k != "target"} for op in ops if op in OPS},
            "cases": {c.label: {"op": c.op, "desc": c.desc, "x": c.x, "series": c.series} for c in cases},
            "rows": rows, "notes": list(notes),
            "elapsed_s": None if elapsed_s is None else round(elapsed_s, 1),
            "estimate_s": None if estimate_s is None else {k: round(v) for k, v in estimate_s.items()}}


def _measure(case: Case, mode: str, name: str, cfg: Config, ref):
    prov = case.providers[name]
    with prov.context():  # around building, the first call and timing: backward dispatches too
        inputs, grads = case.make_inputs()
        thunk = (case.thunk or make_thunk)(prov.fn, inputs, grads, mode)
        first_ms, out = once_ms(thunk, cfg.device)  # first call: compiles; its result is checked
        out = as_tuple(out)
        err = None if ref is None or not prov.check else _rel_err(out, ref)
        ms = first_ms if cfg.tiny else time_ms(thunk, cfg.device, quick=cfg.quick)
        work = launches_and_syncs(thunk) if case.count_launches and cfg.device == "cuda" else None
    row = {"op": case.op, "case": case.label, "desc": case.desc, "mode": mode, "provider": name, **case.params,
           "ms": ms, "bytes": case.bytes_moved[mode], "max_rel_err": err}
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
        "argv": sys.argv[1:], "quick": cfg.quick, "tiny": cfg.tiny, "compile": cfg.compile,
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

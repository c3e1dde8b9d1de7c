"""Kernel report: compile every Triton kernel, at the launch configurations its launcher chooses, for
sm_90a (H100/H200) with the GPU machine's triton (3.6), on a CPU, and report what the GPU compiler sees.

    pip install --target /tmp/triton36 triton==3.6.0 --no-deps     # beside the env's newer triton
    python benchmarks/kernel_report.py --triton-path /tmp/triton36 --check

How: the launchers run over a sweep of shapes and dtypes (fusedstab.kernels.introspect.cases) on meta
tensors, under a simulated H100 (132 SMs: the grids and tiles a GPU would get); each ``kernel[grid](...)``
is recorded instead of launched, then specialized exactly as triton would on a GPU (its own binder,
a stand-in driver that reports sm_90a) and compiled to a cubin in parallel processes. Identical
variants (same kernel, specialization, constexprs and options) compile once.

Per variant: registers, spill stores/loads and stack (ptxas -v), shared memory, the widest global load
and store in the PTX (bits: 128 is ``ld.global.v4.b32``, 16 a scalar bf16), and a lint of the TTIR for
int32 index products: a program index (or anything derived from it) multiplied in int32 by a value
known only at run time, reaching a pointer (``pid * N`` wraps once (programs - 1) * N >= 2^31).

``--check`` fails (exit 1) on: a compile error; a spill in a kernel of NO_SPILL (2- and 4-byte dtypes);
a widest global load under 128 bits (16 bytes a thread: ld.global.v4.b32) in a kernel of VECTOR_LOADS
at a case whose sizes are multiples of 16 (an aligned case); an int32 index product. The table goes to benchmarks/kernel_report.md (committed:
benchmarks/NOTES.md cites it). ``--full`` sweeps more shapes (slow: for a human, not CI).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Kernels that must not spill in 2- and 4-byte dtypes (fp64 variants are reported, not checked), and
# streaming kernels whose aligned cases must load 128 bits (16 bytes) a thread at a time.
NO_SPILL = {
    "_fwd_rows_kernel", "_fwd_long_kernel", "_fwd_split_stats_kernel", "_fwd_split_norm_kernel",
    "_bwd_rows_kernel", "_bwd_split_sums_kernel", "_bwd_split_chunk_kernel",
    "_fwd_stats_kernel", "_fwd_norm_kernel", "_bwd_reduce_kernel", "_bwd_dx_kernel",
    "_rows_fwd_kernel", "_rows_bwd_kernel",
    "_stats_kernel", "_elemt_kernel", "_bwd_elemt_kernel", "_combine_kernel",
    "_fwd_kernel", "_bwd_kernel",
    "_norm_chunks_kernel", "_scale_chunks_kernel", "_per_tensor_kernel", "_stats_chunks_kernel",
    "_stats_per_tensor_kernel", "_linear_leaky_relu_kernel",
}
VECTOR_LOADS = {
    "_fwd_rows_kernel", "_fwd_long_kernel", "_fwd_split_stats_kernel", "_fwd_split_norm_kernel",
    "_bwd_rows_kernel", "_bwd_split_sums_kernel", "_bwd_split_chunk_kernel",
    "_rows_fwd_kernel", "_rows_bwd_kernel",
    "_elemt_kernel", "_bwd_elemt_kernel", "_stats_kernel", "_bwd_reduce_kernel",
    "_fwd_kernel", "_bwd_kernel",
    "_norm_chunks_kernel", "_scale_chunks_kernel", "_stats_chunks_kernel",
}
# Kernels whose spills are known and accepted (reported, not failed): the reason is in NOTES.md.
SPILL_OK: dict[str, str] = {}


# ----------------------------------------------------------------------------- triton set-up
def _import_triton(path: str | None):
    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kernel-report-"))  # ptxas always runs
    if path:
        sys.path.insert(0, path)
    import triton

    return triton


class _Driver:
    """Stands in for the CUDA driver: a current device 0 of compute capability 9.0 (sm_90a)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@contextlib.contextmanager
def _capture_compiles():
    """Within: a kernel's run(warmup=True) specializes its arguments as on a GPU and records what it
    would compile (kernel, signature, constexprs, options, attrs), compiling nothing."""
    from triton.runtime.jit import JITFunction

    seen = []

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        seen.append((self, signature, constexprs, options, attrs))
        return None

    original = JITFunction._do_compile
    JITFunction._do_compile = do_compile
    try:
        yield seen
    finally:
        JITFunction._do_compile = original


# ----------------------------------------------------------------------------- variants
@dataclasses.dataclass
class Variant:
    kernel: object
    name: str
    signature: dict
    constexprs: dict
    options: object
    attrs: dict
    labels: list
    aligned: bool
    dtype: str

    def key(self):
        return (self.name, repr(sorted(self.signature.items())), repr(sorted(self.constexprs.items(), key=repr)),
                repr(sorted(self.attrs.items(), key=repr)), repr(sorted(vars(self.options).items(), key=repr)))

    def describe(self) -> str:
        names = list(self.signature)
        parts = []
        for path, value in sorted(self.constexprs.items(), key=repr):
            name = names[path[0]] if path and path[0] < len(names) else str(path)
            if value is None:
                continue
            text = getattr(value, "name", None) or str(value)
            parts.append(f"{name}={text}")
        o = self.options
        parts.append(f"w{o.num_warps}s{o.num_stages}")
        return " ".join(parts)


def _main_dtype(signature: dict, constexprs: dict) -> str:
    """The dtype of the kernel's data: a DTYPE constexpr (the multi-tensor kernels read a table of
    addresses first), else the first pointer argument's."""
    names = list(signature)
    for path, value in constexprs.items():
        if path and names[path[0]] == "DTYPE" and hasattr(value, "name"):
            return {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}.get(value.name, value.name)
    for ty in signature.values():
        if isinstance(ty, str) and ty.startswith("*"):
            return ty[1:]
    return "-"


def collect(full: bool) -> list[Variant]:
    from fusedstab.kernels import introspect

    launches = introspect.run_cases(introspect.cases("full" if full else "report"))
    variants: dict[tuple, Variant] = {}
    with _capture_compiles() as seen:
        for launch in launches:
            start = len(seen)
            launch.kernel.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
            for kernel, signature, constexprs, options, attrs in seen[start:]:
                v = Variant(kernel, launch.name, signature, constexprs, options, attrs, [launch.label],
                            launch.label.endswith("[aligned]"), _main_dtype(signature, constexprs))
                k = v.key()
                if k in variants:
                    variants[k].labels.append(launch.label)
                    variants[k].aligned |= v.aligned
                else:
                    variants[k] = v
    return list(variants.values())


# ----------------------------------------------------------------------------- compile and measure
_VARIANTS: list[Variant] = []

_LD = re.compile(r"\bld\.global(?:\.[a-zA-Z0-9:_]+)*?(?:\.v(\d))?\.([busf])(\d+)\b")
_ST = re.compile(r"\bst\.global(?:\.[a-zA-Z0-9:_]+)*?(?:\.v(\d))?\.([busf])(\d+)\b")


_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def _widest(ptx: str, pattern) -> int:
    best = 0
    for vec, _, bits in pattern.findall(ptx):
        best = max(best, int(vec or 1) * int(bits))
    if pattern is _LD:  # global -> shared copies (pipelined loads: attention, matmul) count as loads
        for size in _CP_ASYNC.findall(ptx):
            best = max(best, 8 * int(size, 0))
    return best


_VALUE = re.compile(r"%[\w.$-]+")
_ASSIGN = re.compile(r"^((?:%[\w.$-]+(?::\d+)?(?:, )?)+) = ([\w.]+)(.*)$")
_FOR = re.compile(r"scf\.for (%[\w.$-]+) = (%[\w.$-]+) to (%[\w.$-]+) step (%[\w.$-]+)(.*)$")


def i32_index_products(ttir: str) -> list[str]:
    """TTIR lines where an int32 product of a program index and a run-time value reaches a pointer.

    Taint: P = derived from tt.get_program_id (a loop counter starting or stepping from one included;
    cleared by a widening to i64); X = the result of an i32 arith.muli of a P or X value by a value that
    is not a constant, and anything computed from it (a widening included: the wrap has happened). A
    tt.addptr whose offset is X is reported: ``pid * N`` wraps once (programs - 1) * N >= 2^31."""
    lines = [re.sub(r"\s+loc\(.*\)$", "", ln.strip()) for ln in ttir.splitlines()]
    P, X, const = set(), set(), set()

    def add(dst, names):
        new = [n for n in names if n not in dst]
        dst.update(new)
        return bool(new)

    for _ in range(10):  # to a fixed point: loop-carried values come back around
        changed = False
        for ln in lines:
            m = _ASSIGN.match(ln)
            outs = []
            if m:
                outs = [re.sub(r":\d+$", "", o) for o in re.findall(r"%[\w.$-]+(?::\d+)?", m.group(1))]
                op, rest = m.group(2), m.group(3)
            else:
                op, rest = "", ln
            if op == "scf.for" or ln.startswith("scf.for"):
                f = _FOR.search(ln)
                if f:
                    iv, lb, _, step, tail = f.groups()
                    if lb in P or step in P:
                        changed |= add(P, [iv])
                    if lb in X or step in X:
                        changed |= add(X, [iv])
                    for arg, init in re.findall(r"(%[\w.$-]+) = (%[\w.$-]+)", tail):
                        if init in P:
                            changed |= add(P, [arg])
                        if init in X:
                            changed |= add(X, [arg])
                continue
            if not m:
                continue
            ins = _VALUE.findall(rest)
            if op == "arith.constant":
                changed |= add(const, outs)
                continue
            if op == "tt.get_program_id":
                changed |= add(P, outs)
                continue
            in_p = any(v in P for v in ins)
            in_x = any(v in X for v in ins)
            if ins and all(v in const for v in ins) and op in ("tt.splat", "tt.broadcast", "tt.expand_dims"):
                changed |= add(const, outs)
            i32 = re.search(r":\s*(?:tensor<[^>]*xi32>|i32)\s*$", rest) is not None
            if op == "arith.muli" and i32 and (in_p or in_x) and any(v not in const and v not in P | X for v in ins):
                changed |= add(X, outs)
            elif op == "arith.muli" and i32 and in_p and all(v in P for v in ins):
                changed |= add(X, outs)  # two program-derived values: still a run-time product
            elif in_x:
                changed |= add(X, outs)
            widened = op in ("arith.extsi", "arith.extui") and re.search(r"to (?:tensor<[^>]*xi64>|i64)$", rest)
            if in_p and not widened:
                changed |= add(P, outs)
        if not changed:
            break
    hits = []
    for ln in lines:
        m = re.match(r"(%[\w.$-]+) = tt\.addptr (%[\w.$-]+), (%[\w.$-]+)", ln)
        if m and m.group(3) in X:
            hits.append(ln)
    return hits


def ttir_of(v: Variant) -> str:
    """The TTIR of a variant, without the later stages (no ptxas): fast, for the lint alone."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    src = ASTSource(v.kernel, v.signature, v.constexprs, v.attrs)
    options = backend.parse_options(dict(vars(v.options), **src.parse_options()))
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    return str(stages["ttir"](module, {"target": target, **options.__dict__}))


def _lint_one(i: int) -> dict:
    v = _VARIANTS[i]
    try:
        return {"i": i, "i32": i32_index_products(ttir_of(v))}
    except Exception as e:  # noqa: BLE001
        return {"i": i, "error": f"{type(e).__name__}: {e}"[:300], "i32": []}


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _compile_one(i: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v = _VARIANTS[i]
    knobs.nvidia.dump_ptxas_log = True
    out = {"i": i}
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            c = triton.compile(ASTSource(v.kernel, v.signature, v.constexprs, v.attrs),
                               target=GPUTarget("cuda", 90, 32), options=vars(v.options))
    except Exception as e:  # noqa: BLE001: every failure is a row of the report
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        out["seconds"] = time.perf_counter() - t0
        return out
    log = buf.getvalue()
    m = _PTXAS.search(log)
    r = _REGS.search(log)
    out.update(
        seconds=time.perf_counter() - t0,
        regs=int(r.group(1)) if r else -1,
        stack=int(m.group(1)) if m else -1,
        spill_st=int(m.group(2)) if m else -1,
        spill_ld=int(m.group(3)) if m else -1,
        smem=int(c.metadata.shared),
        ld_bits=_widest(c.asm["ptx"], _LD),
        st_bits=_widest(c.asm["ptx"], _ST),
        i32=i32_index_products(c.asm["ttir"]),
    )
    return out


# ----------------------------------------------------------------------------- report
def problems(v: Variant, r: dict) -> list[str]:
    out = []
    if "error" in r:
        return ["compile error"]
    checked = v.dtype in ("bf16", "fp16", "fp32")
    if checked and v.name in NO_SPILL and v.name not in SPILL_OK and (r["spill_st"] or r["spill_ld"]):
        out.append("spills")
    if checked and v.aligned and v.name in VECTOR_LOADS and r["ld_bits"] < 128:
        out.append("scalar loads")
    if r["i32"]:
        out.append("int32 index product")
    return out


def write_table(variants, results, path: Path, seconds: float, triton_version: str, jobs: int):
    rows = []
    for v, r in zip(variants, results):
        rows.append((v, r, problems(v, r)))
    rows.sort(key=lambda t: (t[0].kernel.fn.__module__, t[0].name, t[0].dtype, t[0].describe()))
    shown: dict = {}  # variants that differ only in argument alignment and compile alike: one row
    for v, r, probs in rows:
        key = (v.kernel.fn.__module__, v.name, v.dtype, v.describe(), v.aligned, tuple(probs),
               tuple(r.get(k) for k in ("error", "regs", "spill_st", "spill_ld", "stack", "smem", "ld_bits", "st_bits")))
        if key in shown:
            shown[key][0].labels.extend(v.labels)
        else:
            shown[key] = (dataclasses.replace(v, labels=list(v.labels)), r, probs)
    table_rows = list(shown.values())
    lines = [
        "# Kernel report: every Triton kernel compiled for sm_90a",
        "",
        f"Generated by `python benchmarks/kernel_report.py` with triton {triton_version} (the GPU machine's), "
        f"target cuda sm_90a, launches sized for a simulated H100 (132 SMs). {len(variants)} distinct variants "
        f"from {sum(len(v.labels) for v in variants)} recorded launches; compiled in {seconds:.0f} s on {jobs} "
        "processes. Do not edit by hand: rerun the script.",
        "",
        "Columns: registers per thread; spill stores / loads and stack frame (bytes, ptxas -v); shared memory "
        "(bytes); the widest global load / store in the PTX (bits: 128 = 16 bytes per thread per access, 16 = "
        "one bf16); `check`: what `--check` fails on (blank: nothing). `aligned`: a case whose sizes are "
        "multiples of 16, where streaming kernels must load 128 bits at a time.",
        "",
        "| module | kernel | dtype | variant | regs | spill st/ld | stack | smem | ld bits | st bits | aligned | first case (+ more) | check |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for v, r, probs in table_rows:
        mod = v.kernel.fn.__module__.rsplit(".", 1)[-1]
        more = f" (+{len(v.labels) - 1})" if len(v.labels) > 1 else ""
        if "error" in r:
            lines.append(f"| {mod} | {v.name} | {v.dtype} | {v.describe()} | | | | | | | {'yes' if v.aligned else ''} | "
                         f"{v.labels[0]}{more} | **{r['error']}** |")
            continue
        check = ", ".join(probs)
        if not probs and v.name in SPILL_OK and (r["spill_st"] or r["spill_ld"]):
            check = f"spills accepted: {SPILL_OK[v.name]}"
        lines.append(
            f"| {mod} | {v.name} | {v.dtype} | {v.describe()} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | "
            f"{r['stack']} | {r['smem']} | {r['ld_bits']} | {r['st_bits']} | {'yes' if v.aligned else ''} | "
            f"{v.labels[0]}{more} | {('**' + check + '**') if probs else check} |")
    path.write_text("\n".join(lines) + "\n")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton-path", help="a directory holding triton 3.6 (pip install --target DIR triton==3.6.0)")
    p.add_argument("--any-triton", action="store_true", help="accept a triton other than 3.6")
    p.add_argument("--check", action="store_true", help="exit 1 on a compile error, a forbidden spill or scalar load")
    p.add_argument("--full", action="store_true", help="the larger sweep (slow)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernel_report.md")
    p.add_argument("--only", help="keep kernels whose name contains this")
    p.add_argument("--lint-only", action="store_true",
                   help="only the int32 index-product lint, on the TTIR (no ptxas, no table; any triton)")
    a = p.parse_args(argv)

    triton = _import_triton(a.triton_path)
    if not triton.__version__.startswith("3.6") and not (a.any_triton or a.lint_only):
        print(f"kernel_report: triton {triton.__version__} imported from {triton.__file__}; the GPU machine runs 3.6 "
              "(pass --triton-path, or --any-triton)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    driver.set_active(_Driver(GPUTarget("cuda", 90, 32)))
    t0 = time.perf_counter()
    variants = collect(a.full)
    if a.only:
        variants = [v for v in variants if a.only in v.name]
    print(f"kernel_report: triton {triton.__version__}, {len(variants)} variants to compile "
          f"({time.perf_counter() - t0:.1f} s to record)", file=sys.stderr, flush=True)
    _VARIANTS[:] = variants
    if a.lint_only:
        return _lint(variants, a.jobs)
    t1 = time.perf_counter()
    order = sorted(range(len(variants)), key=lambda i: -_cost(variants[i]))  # long compiles first
    results: list = [None] * len(variants)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, a.jobs)) as pool:
        for n, r in enumerate(pool.imap_unordered(_compile_one, order), 1):
            results[r["i"]] = r
            if n % 25 == 0 or n == len(order):
                print(f"  {n}/{len(order)} compiled ({time.perf_counter() - t1:.0f} s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t1
    rows = write_table(variants, results, a.out, seconds, triton.__version__, a.jobs)
    bad = [(v, r, probs) for v, r, probs in rows if probs]
    by_kernel = collections.Counter(v.name for v in variants)
    print(f"kernel_report: {len(variants)} variants of {len(by_kernel)} kernels in {seconds:.0f} s "
          f"(slowest {max((r.get('seconds', 0) for r in results), default=0):.1f} s); table: {a.out}")
    per_module = collections.defaultdict(lambda: [0, 0.0])
    for v, r in zip(variants, results):
        m = per_module[v.kernel.fn.__module__.rsplit(".", 1)[-1]]
        m[0] += 1
        m[1] += r.get("seconds", 0)
    print("  compile time by module: " + "; ".join(f"{k} {n} variants {t:.0f} s" for k, (n, t) in
                                                   sorted(per_module.items(), key=lambda kv: -kv[1][1])),
          file=sys.stderr)
    slowest = sorted(zip(variants, results), key=lambda t: -t[1].get("seconds", 0))[:8]
    print("  slowest: " + "; ".join(f"{v.name} {v.dtype} {r.get('seconds', 0):.1f} s" for v, r in slowest),
          file=sys.stderr)
    for v, r, probs in bad:
        print(f"  {', '.join(probs)}: {v.name} {v.dtype} {v.describe()} [{v.labels[0]}]"
              + (f": {r['error']}" if "error" in r else "")
              + (f"\n      {r['i32'][0]}" if r.get("i32") else ""))
    return 1 if (a.check and bad) else 0


def _lint(variants, jobs: int) -> int:
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
        results = list(pool.imap_unordered(_lint_one, range(len(variants))))
    bad = [r for r in results if r["i32"] or "error" in r]
    print(f"kernel_report --lint-only: {len(variants)} variants, {len(bad)} with int32 index products or errors "
          f"({time.perf_counter() - t0:.0f} s)")
    for r in bad:
        v = variants[r["i"]]
        print(f"  {v.name} {v.dtype} {v.describe()} [{v.labels[0]}]: " + (r.get("error") or r["i32"][0]))
    return 1 if bad else 0


def _cost(v: Variant) -> int:
    return 3 if "attn" in v.name else 2 if "linear" in v.name else 1


if __name__ == "__main__":
    sys.exit(main())

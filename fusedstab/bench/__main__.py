"""``python -m fusedstab.bench``: time every op against eager torch, torch.compile and peers."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import OPS

FIGURE_S = 1.3  # seconds to draw and write one op's figure on a 2-core CPU (matplotlib, Agg)
MODES_HELP = "fwd, bwd, fwd+bwd (every op but clip_grad_norm); norm, clip (clip_grad_norm)"
DESCRIPTION = """\
Time fusedstab's ops against eager PyTorch, torch.compile and installed peers, forward and
backward. Prints a report (machine, yardsticks, what each provider is, one table per op, a
summary) and writes it as JSON, text, a Markdown page and one figure per op.

On a GPU: the full sweep in bf16, into benchmarks/results/. On CPU: a quick fp32 set into
bench-results/: on 2 idle cores about 45 s with a warm torch.compile cache, about 4 min on the
first run; --no-compile: about 25 s. The first line of a run gives its own estimate."""

EXAMPLES = """\
examples:
  python -m fusedstab.bench                                  # everything, this machine's defaults
  python -m fusedstab.bench --ops layer_norm rms_norm --modes fwd
  python -m fusedstab.bench --ops clip_grad_norm --dtype fp32
  python -m fusedstab.bench --providers fusedstab-triton --n 4096 8192   # eager is always kept
  python -m fusedstab.bench --no-compile --plot svg --out my-results
  python -m fusedstab.bench --tiny --plot none               # seconds: does every provider run?"""


def _listing(title: str, items: dict[str, str]) -> str:
    import textwrap

    w = max(map(len, items)) + 2
    lines = [title]
    for name, what in items.items():
        lines += textwrap.wrap(what, 100, initial_indent=f"  {name:{w}}", subsequent_indent=" " * (w + 2))
    return "\n".join(lines)


def provider_names() -> dict[str, str]:
    """Every provider the harness knows, with what it is; fusedstab's come one per backend."""
    from .providers import ABOUT, about

    try:
        from fusedstab.backend import BACKENDS
    except Exception:  # a broken fusedstab: the others can still be timed
        BACKENDS = ()
    names = {"eager": ABOUT["eager"], "compile": ABOUT["compile"]}
    names.update({f"fusedstab-{b}": about(f"fusedstab-{b}") for b in BACKENDS})
    names.update({k: v for k, v in ABOUT.items() if k not in names})
    return names


def parser() -> argparse.ArgumentParser:
    epilog = "\n\n".join([
        _listing("ops (--ops):", {op: info.what for op, info in OPS.items()}),
        _listing("providers (--providers; only those that can run here are timed):", provider_names()),
        EXAMPLES])
    p = argparse.ArgumentParser(prog="python -m fusedstab.bench", usage="python -m fusedstab.bench [options]",
                                description=DESCRIPTION, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), metavar="OP",
                   help="ops to time (default: all; listed below)")
    p.add_argument("--modes", nargs="+", default=None, metavar="MODE", help=f"modes to time (default: all): {MODES_HELP}")
    p.add_argument("--providers", nargs="+", metavar="NAME", help="keep only these providers (eager is always kept)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is a GPU")
    p.add_argument("--quick", action="store_true", help="a few shapes per op (always on for CPU unless --full)")
    p.add_argument("--full", action="store_true", help="the full sweep even on CPU (slow)")
    p.add_argument("--tiny", action="store_true",
                   help="one tiny shape per op, one call each, no torch.compile: checks that every provider "
                        "runs and agrees with eager in seconds; the times mean nothing")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (no warm-ups)")
    p.add_argument("--n", nargs="+", type=int, metavar="N", help="hidden sizes for the norms instead of the default")
    p.add_argument("--size-mib", type=int, metavar="MIB", help="size of x in MiB (default: 256 on a GPU, 4 on CPU)")
    p.add_argument("--plot", choices=["png", "svg", "none"], default="png", help="figure format (default: png)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where to write (default: benchmarks/results/ on a GPU, bench-results/ on CPU)")
    return p


def parse(argv=None) -> argparse.Namespace:
    p = parser()
    a = p.parse_args(argv)
    from .case import MODES

    bad = [m for m in a.modes or () if m not in MODES]
    if bad:
        p.error(f"unknown mode {bad[0]!r}; choose from: {MODES_HELP}")
    known = provider_names()
    bad = [n for n in a.providers or () if n not in known]
    if bad:
        p.error(f"unknown provider {bad[0]!r}; choose from: {', '.join(known)}")
    return a


def main(argv=None) -> int:
    a = parse(argv)  # before the work below: --help and argument errors come back at once
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # Spinning OpenMP workers on a 2-core machine make CPU times jump in 4 ms scheduler quanta
        # (24 ms for a 1.5 ms LayerNorm). libgomp reads this variable only when loaded: re-exec.
        os.environ["OMP_WAIT_POLICY"] = "passive"
        os.execv(sys.executable, [sys.executable, "-m", "fusedstab.bench", *sys.argv[1:]])

    from .case import DTYPES, Config
    from .progress import Progress, duration
    from .report import text, write
    from .runner import run

    t0 = time.monotonic()
    dtype = DTYPES[a.dtype or ("bf16" if device == "cuda" else "fp32")]
    cfg = Config(device, dtype, quick=a.quick or (device == "cpu" and not a.full), tiny=a.tiny,
                 compile=not a.no_compile and not a.tiny,  # tiny: a compile warm-up would dominate it
                 rows_n=tuple(a.n) if a.n else None, target_mib=a.size_mib)
    prog = Progress()
    try:
        figures_s = 0.0 if a.plot == "none" else FIGURE_S * len(a.ops)
        res = run(cfg, a.ops, modes=a.modes, only=a.providers, log=prog.log, progress=prog, extra_s=figures_s)
        out = a.out or Path("benchmarks/results" if device == "cuda" else "bench-results")
        paths = write(res, out, plot=a.plot, log=prog.log)
        prog.log(f"done in {duration(time.monotonic() - t0)}")
    finally:
        prog.close()
    print(text(res))
    print("\nwrote: " + " ".join(map(str, paths)))
    return 0 if res["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())

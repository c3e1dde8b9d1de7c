"""``python -m fusedstab.bench``: time every op against eager torch, torch.compile and peers."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import MODES, OPS
from .case import DTYPES, Config
from .report import notes, summary, table, write
from .runner import run


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedstab.bench", description=__doc__)
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--quick", action="store_true", help="a few row lengths (always on for CPU unless --full)")
    p.add_argument("--full", action="store_true", help="the full sweep even on CPU (slow)")
    p.add_argument("--providers", nargs="+", metavar="NAME", help="keep only these (eager is always kept)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--n", nargs="+", type=int, metavar="N", help="row lengths to sweep instead of the default")
    p.add_argument("--size-mib", type=int, help="size of x in MiB (default: 256 on a GPU, 4 on CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/ on a GPU, bench-results/ on CPU")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # one tiny shape: the harness test
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # Spinning OpenMP workers on a 2-core machine make CPU times jump in 4 ms scheduler quanta
        # (24 ms for a 1.5 ms LayerNorm). libgomp reads this variable only when loaded: re-exec.
        os.environ["OMP_WAIT_POLICY"] = "passive"
        os.execv(sys.executable, [sys.executable, "-m", "fusedstab.bench", *sys.argv[1:]])
    dtype = DTYPES[a.dtype or ("bf16" if device == "cuda" else "fp32")]
    cpu_quick = device == "cpu" and not a.full
    compile_ = not a.no_compile and not a.smoke  # smoke: compile warm-up would dominate the test
    cfg = Config(device, dtype, quick=a.quick or cpu_quick, smoke=a.smoke, compile=compile_,
                 rows_n=tuple(a.n) if a.n else None, target_mib=a.size_mib)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    res = run(cfg, a.ops, modes=a.modes, only=a.providers, log=log)
    out = a.out or Path("benchmarks/results" if device == "cuda" else "bench-results")
    paths = write(res, out)
    print("\n\n".join(filter(None, [table(res), summary(res), notes(res)])))
    print("\nwrote: " + " ".join(map(str, paths)))
    return 0 if res["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""int32 index products (issue 13, item 3): a program index times a size, in int32, reaching a pointer.

LayerNorm's chunked backward addressed its partial row as ``DB_PART + pid * N``: int32, so it wrapped
once (programs - 1) * N >= 2^31 (N = 2^23 with 257+ programs), which no CPU test can allocate. The
check is therefore static: benchmarks/kernel_report.py compiles every kernel variant of its sweep to
TTIR (the env's triton; no GPU, no ptxas) and follows values derived from tt.get_program_id through
int32 multiplications by run-time values into tt.addptr (``i32_index_products``). CI's kernel report
runs the same lint with triton 3.6 on top of registers, spills and vector widths.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "kernel_report.py"


def _report():
    spec = importlib.util.spec_from_file_location("kernel_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_report", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Lines of the TTIR of the old _bwd_long_kernel (triton 3.6, sm_90a), cut down: the row loop starts at
# the program id; the dx store widens the row first (fine), the partial row does not (the bug).
OLD_BWD_LONG = """
    %c4096_i32 = arith.constant 4096 : i32 loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc81)
    %0 = tt.get_num_programs x : i32 loc(#loc4)
    scf.for %row = %pid to %M step %0  : i32 {
      %row64 = arith.extsi %row : i32 to i64 loc(#loc83)
      %rstd = tt.addptr %RSTD, %row64 : !tt.ptr<f32>, i64 loc(#loc84)
        %1 = arith.extsi %N : i32 to i64 loc(#loc57)
        %2 = arith.muli %row64, %1 : i64 loc(#loc57)
        %3 = tt.addptr %DX, %2 : !tt.ptr<bf16>, i64 loc(#loc58)
        %p = arith.muli %pid, %N : i32 loc(#loc130)
        %p_30 = tt.addptr %DB_PART, %p : !tt.ptr<f32>, i32 loc(#loc131)
        %q = arith.muli %pid, %c4096_i32 : i32 loc(#loc130)
        %q_1 = tt.addptr %X, %q : !tt.ptr<f32>, i32 loc(#loc131)
        %r = arith.muli %row, %N : i32 loc(#loc130)
        %r_1 = arith.extsi %r : i32 to i64 loc(#loc130)
        %r_2 = tt.addptr %Y, %r_1 : !tt.ptr<f32>, i64 loc(#loc131)
"""


def test_lint_flags_program_index_times_size():
    hits = _report().i32_index_products(OLD_BWD_LONG)
    # pid * N (the bug) and row * N widened after the product (still wrapped); not pid * 4096 (a
    # constant: bounded by the grid), not row64 * N (int64)
    assert [h.split(" = ")[0] for h in hits] == ["%p_30", "%r_2"]


def test_lint_passes_fixed_code():
    fixed = OLD_BWD_LONG.replace("%p = arith.muli %pid, %N : i32", "%p = arith.muli %pid64, %N64 : i64") \
                        .replace("%r = arith.muli %row, %N : i32", "%r = arith.muli %row64, %N64 : i64")
    assert _report().i32_index_products(fixed) == []


def test_every_kernel_variant_is_free_of_int32_index_products():
    """Every kernel at every launch configuration of the report's sweep (about 100 variants, ~30 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(REPORT), "--lint-only", "--jobs", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 with int32 index products or errors" in proc.stdout

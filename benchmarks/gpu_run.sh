#!/usr/bin/env bash
# The one script for a GPU run (see shared GPU.md): GPU tests, then the full benchmark sweep.
# Results land in benchmarks/results/ as the harness wrote them (commit those files), and are also
# copied into $OUT when it is set. Extra arguments go to the harness, e.g. `--ops layer_norm`.
# Installs nothing: the GPU machine has no package registry; the checkout runs from PYTHONPATH.
# Time: nothing here caps it; the device allows 10 minutes a command. Each harness call writes its
# own files and they are copied into $OUT as soon as it ends, so a run cut short keeps what finished;
# the log gives each stage's start time. The default run ends with attention, the longest op (24
# shapes x 3 modes x up to 9 providers, compute-bound calls up to ~20 ms, a torch.compile per shape).
# If the whole run does not fit one call, split it: `bash benchmarks/gpu_run.sh --ops attention` in a
# second call, GPU_TESTS=0 to leave the GPU tests out of it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/results
LOG=$(mktemp -d)

echo "== machine"
nvidia-smi || echo "nvidia-smi not found"
python - <<'PY'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}")
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
raise SystemExit(0 if torch.cuda.is_available() else 3)
PY
if [ $? -ne 0 ]; then echo "no CUDA GPU: this script records GPU results, nothing run"; exit 3; fi

[ -n "${OUT:-}" ] && mkdir -p "$OUT"
tests_rc=0
if [ "${GPU_TESTS:-1}" != 0 ]; then
    echo "== GPU tests: pytest -q -m gpu tests (at ${SECONDS}s)"
    python -m pytest -q -m gpu tests 2>&1 | tee "$LOG/gpu-tests.log"
    tests_rc=${PIPESTATUS[0]}
    [ -n "${OUT:-}" ] && cp "$LOG/gpu-tests.log" "$OUT/"
fi

bench() {  # one harness call: its table is added to the log, the files it wrote go to $OUT at once
    echo "== benchmark: python -m fusedstab.bench $* (at ${SECONDS}s)"
    python -m fusedstab.bench "$@" > "$LOG/part.txt"  # progress goes to stderr
    local rc=$?
    cat "$LOG/part.txt" >> "$LOG/table.txt"
    if [ -n "${OUT:-}" ]; then  # the harness's last line names its files: "wrote: a.json a.txt a.png"
        for f in $(sed -n 's/^wrote: //p' "$LOG/part.txt"); do cp "$f" "$OUT/"; done
    fi
    return $rc
}

: > "$LOG/table.txt"
if [ $# -eq 0 ]; then
    others=$(python -c "from fusedstab.bench import OPS; print(' '.join(o for o in OPS if o != 'attention'))")
    bench --dtype bf16 --out "$RESULTS" --ops $others
    bench_rc=$?
    # gradient clipping is also reported in fp32 (fp32 grads are the common case)
    bench --ops clip_grad_norm --dtype fp32 --out "$RESULTS"
    bench_rc=$((bench_rc | $?))
    bench --ops attention --dtype bf16 --out "$RESULTS"  # last: the longest op (see the top)
    bench_rc=$((bench_rc | $?))
else
    bench --dtype bf16 --out "$RESULTS" "$@"
    bench_rc=$?
fi

echo "== results (GPU tests exit $tests_rc, benchmark exit $bench_rc, ${SECONDS}s in all)"
cat "$LOG/table.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

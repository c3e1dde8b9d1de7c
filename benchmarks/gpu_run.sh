#!/usr/bin/env bash
# The one script for a GPU run (see shared GPU.md): GPU tests, then the full benchmark sweep.
# Results land in benchmarks/results/ as the harness wrote them (commit those files), and are also
# copied into $OUT when it is set. Extra arguments go to the harness, e.g. `--ops layer_norm`.
# Installs nothing: the GPU machine has no package registry; the checkout runs from PYTHONPATH.
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

echo "== GPU tests: pytest -q -m gpu tests"
python -m pytest -q -m gpu tests 2>&1 | tee "$LOG/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark: python -m fusedstab.bench --dtype bf16 --out $RESULTS $*"
python -m fusedstab.bench --dtype bf16 --out "$RESULTS" "$@" > "$LOG/table.txt"  # progress goes to stderr
bench_rc=$?
if [ $# -eq 0 ]; then  # gradient clipping is also reported in fp32 (fp32 grads are the common case)
    echo "== benchmark: python -m fusedstab.bench --ops clip_grad_norm --dtype fp32 --out $RESULTS"
    python -m fusedstab.bench --ops clip_grad_norm --dtype fp32 --out "$RESULTS" >> "$LOG/table.txt"
    bench_rc=$((bench_rc | $?))
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$LOG/gpu-tests.log" "$OUT/"
    # the harness's last line names the files it wrote: "wrote: a.json a.txt a.png"
    for f in $(sed -n 's/^wrote: //p' "$LOG/table.txt"); do cp "$f" "$OUT/"; done
fi

echo "== results (GPU tests exit $tests_rc, benchmark exit $bench_rc)"
cat "$LOG/table.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

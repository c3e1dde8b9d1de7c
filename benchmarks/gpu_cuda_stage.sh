#!/usr/bin/env bash
# The cuda backend's stage of a GPU run (benchmarks/gpu_run.sh can call it; it also runs alone):
#   1. build the CUDA extension first (JIT: MAX_JOBS = the cores, the device's arch only), timed;
#   2. the CUDA tests: tests/test_cuda_kernels.py and test_cuda_channel_norm.py, then the GPU op tests
#      of the ops the cuda backend serves (LayerNorm family, bias + Leaky ReLU, the clip: sync-free,
#      CUDA graphs; GroupNorm, BatchNorm) on that backend;
#   3. compute-sanitizer memcheck and racecheck over benchmarks/cuda_sanitize.py (every kernel once);
#   4. benchmarks/cuda_bench.py: cuda vs triton vs eager, fractions of the copy bandwidth.
# Logs and results go to $OUT (if set) as each stage ends. A stage past CUDA_STAGE_BUDGET seconds
# (default 480) is not started; CUDA_STAGE_TESTS=0 / CUDA_STAGE_BENCH=0 leave out steps 2a / 4 (gpu_run.sh
# runs those in its own test and benchmark stages). Exit: 0 when every stage that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FUSEDSTAB_REQUIRE_EXT=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
BUDGET=${CUDA_STAGE_BUDGET:-480}
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
rc=0
stage() {  # stage NAME CMD...: runs CMD unless the budget is spent, logs to $LOG/NAME.log
    local name=$1; shift
    if [ "$SECONDS" -ge "$BUDGET" ]; then echo "== $name: skipped (budget of ${BUDGET}s spent)"; return; fi
    echo "== $name (at ${SECONDS}s): $*"
    "$@" > "$LOG/$name.log" 2>&1
    local r=$?
    tail -n 25 "$LOG/$name.log"
    echo "== $name: exit $r (at ${SECONDS}s)"
    [ $r -eq 0 ] || rc=1
}

if ! python -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 3)"; then
    echo "no CUDA GPU: the cuda stage has nothing to run"; exit 3
fi
stage build python -c "
import time, torch
from fusedstab import extension
t = time.time(); why = extension.load_cuda()
print(f'cuda library: {why or \"loaded\"} in {time.time() - t:.0f}s; device {torch.cuda.get_device_name()}')
raise SystemExit(1 if why else 0)"
if [ $rc -ne 0 ]; then echo "the CUDA library did not build: nothing else to run"; exit 1; fi

[ "${CUDA_STAGE_TESTS:-1}" = 1 ] && stage cuda-tests python -m pytest -q tests/test_cuda_kernels.py tests/test_cuda_channel_norm.py
stage cuda-op-tests env FUSEDSTAB_TEST_BACKENDS=cuda python -m pytest -q -m gpu \
    tests/test_layer_norm.py tests/test_bias_leaky_relu.py tests/test_clip_grad.py tests/test_group_norm.py \
    tests/test_batch_norm.py

# compute-sanitizer: works on the GPU machine's Firecracker VM, not under gVisor. Say which this is.
if dmesg 2>/dev/null | grep -qi gvisor || grep -qi gvisor /proc/version 2>/dev/null; then runtime=gVisor
elif grep -q virtio_mmio /proc/cmdline 2>/dev/null; then runtime="Firecracker (virtio-mmio)"
else runtime="unknown ($(uname -r))"; fi
echo "== runtime: $runtime"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # each tensor its own allocation: out-of-bounds shows
    stage memcheck "$SAN" --tool memcheck --error-exitcode 9 python benchmarks/cuda_sanitize.py
    stage racecheck "$SAN" --tool racecheck --error-exitcode 9 python benchmarks/cuda_sanitize.py
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
    echo "== compute-sanitizer not found: memcheck / racecheck not run"
fi

if [ "${CUDA_STAGE_BENCH:-1}" = 1 ]; then
    stage cuda-bench python benchmarks/cuda_bench.py --out "${BENCH_OUT:-benchmarks/results}"
    [ -n "${OUT:-}" ] && cp benchmarks/results/cuda_kernels_* "$OUT/" 2>/dev/null
fi
echo "== cuda stage: exit $rc in ${SECONDS}s"
exit $rc

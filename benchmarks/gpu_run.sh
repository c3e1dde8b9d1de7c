#!/usr/bin/env bash
# The one script for a GPU lease (shared GPU.md): 15 minutes of device time in all, start-up included,
# and 10 minutes per command. So it does the most valuable things first, writes every result as soon as
# it has it, and starts no stage that would not end within --budget:
#
#   0 machine   nvidia-smi, python / torch / triton versions
#   1 build     the C++ extension: the CPU library and the CUDA one (JIT, every core, this arch)
#   2 smoke     every op on every backend, fp32 / fp16 / bf16, forward + backward vs torch (gpu_smoke.py)
#   3 tests     the GPU tests (pytest -m gpu -x), the fast files first
#   3b cuda     the cuda backend on the op tests, compute-sanitizer memcheck / racecheck
#   4 core      one or two shapes per op (the harness's --quick sets), fwd and bwd, bf16, against
#               eager, torch.compile and the peers; clipping in its own modes
#   5 sweep     the full sweep, op by op, while time remains (attention last: the longest)
#
# Usage: bash benchmarks/gpu_run.sh [--budget SECONDS] [--out DIR] [--dry-run] [--only STAGE[,STAGE]]
#   --budget   seconds this call may take (default 540: a 10-minute command, less start-up and copying).
#              A stage starts only if its estimate fits in what is left; a running stage is stopped
#              (SIGINT, then KILL) when the budget is spent, and the summary is still written.
#   --out      where logs, smoke.json, the harness's JSON / tables and summary.txt go (default: $OUT
#              when set, else benchmarks/results/gpu-run-<date>); benchmark files also land in
#              benchmarks/results/ as the harness writes them (commit those).
#   --dry-run  the CPU rehearsal: every stage runs its real command at toy size (the smoke test under
#              the Triton interpreter, pytest --collect-only for the tests, the harness on one tiny shape
#              per op), so that the one GPU call cannot fail for a typo. No GPU needed.
#   --only     run these stages only (e.g. --only core,sweep for a second call).
# summary.txt (also printed last) lists each stage: ran / FAILED / stopped / skipped, its time, and
# what is still owed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

BUDGET=540
DRY=0
ONLY=""
OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET="$2"; shift 2 ;;
        --out) OUTDIR="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --only) ONLY=",$2,"; shift 2 ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$OUTDIR" ] || OUTDIR="benchmarks/results/gpu-run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUTDIR"
RESULTS=benchmarks/results
[ "$DRY" = 1 ] && RESULTS="$OUTDIR/dry-run-results"
SUMMARY="$OUTDIR/summary.txt"
RESERVE=20          # seconds kept back for the summary and copying files out
START=$SECONDS
: > "$OUTDIR/stages.tsv"

left() { echo $(( BUDGET - (SECONDS - START) - RESERVE )); }

summary() {  # rewritten after every stage: a run cut short still says what ran and what is owed
    {
        echo "gpu_run.sh $( [ "$DRY" = 1 ] && echo '(DRY RUN on CPU) ')budget ${BUDGET}s, used $(( SECONDS - START ))s, out: $OUTDIR"
        printf '%-22s %-9s %7s  %s\n' stage status seconds note
        while IFS=$'\t' read -r name status secs note; do
            printf '%-22s %-9s %7s  %s\n' "$name" "$status" "$secs" "$note"
        done < "$OUTDIR/stages.tsv"
        owed=$(awk -F'\t' '$2 != "ok" {print $1}' "$OUTDIR/stages.tsv" | tr '\n' ' ')
        echo "owed (not run, failed or stopped): ${owed:-nothing}"
    } > "$SUMMARY"
}

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUTDIR/stages.tsv"; summary; }

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

# stage NAME GROUP ESTIMATE_SECONDS COMMAND...: run it if wanted and its estimate fits; log to NAME.log
stage() {
    local name=$1 group=$2 est=$3; shift 3
    if ! wanted "$group"; then return 0; fi
    local budget_left; budget_left=$(left)
    if [ "$est" -gt "$budget_left" ]; then
        record "$name" skipped 0 "estimate ${est}s > ${budget_left}s left"
        return 0
    fi
    echo "== $name (at $(( SECONDS - START ))s, estimate ${est}s, ${budget_left}s left): $*"
    local t0=$SECONDS rc
    timeout --signal=INT --kill-after=10 "$budget_left" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    rc=${PIPESTATUS[0]}
    local secs=$(( SECONDS - t0 ))
    if [ "$rc" -eq 0 ]; then record "$name" ok "$secs" ""
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; then record "$name" stopped "$secs" "budget spent (rc $rc)"
    else record "$name" FAILED "$secs" "exit $rc: see $name.log"
    fi
    return 0
}

# bench NAME GROUP ESTIMATE OP ARGS...: one harness call; its files are copied to OUTDIR when it ends
bench() {
    local name=$1 group=$2 est=$3 op=$4; shift 4
    stage "$name" "$group" "$est" python -m fusedstab.bench --ops "$op" --out "$RESULTS" "$@"
    local f
    for f in $(sed -n 's/^wrote: //p' "$OUTDIR/$name.log" 2>/dev/null); do cp "$f" "$OUTDIR/" 2>/dev/null; done
}

# ----------------------------------------------------------------------------- 0 machine
echo "== machine"
if [ "$DRY" = 1 ]; then
    echo "dry run: no GPU needed"
else
    nvidia-smi || echo "nvidia-smi not found"
fi
python - <<'PY' 2>&1 | tee "$OUTDIR/machine.log"
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}")
print("cuda:", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
if [ "$DRY" != 1 ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU: this script records GPU results (rehearse on CPU with --dry-run)"; exit 3
fi
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1  # the triton backend on CPU tensors
fi

# ----------------------------------------------------------------------------- 1 build
# The C++ extension first (the smoke test and the tests need it): the CPU library (the op schemas and
# the cpu backend) and the CUDA one (the cuda backend), JIT-built with every core for this device's
# arch only. On the dry run there is no device: the CUDA library is (correctly) absent.
stage build build 240 env MAX_JOBS="$(nproc)" python -c "
import time
from fusedstab import extension
t = time.time(); cpu = extension.load(); cuda = extension.load_cuda()
print(f'cpu library: {cpu or \"loaded\"}; cuda library: {cuda or \"loaded\"}; {time.time() - t:.0f}s')
raise SystemExit(1 if cpu or (cuda and not $DRY) else 0)"  # the dry run has no CUDA library to build

# ----------------------------------------------------------------------------- 2 smoke
if [ "$DRY" = 1 ]; then
    stage smoke smoke 120 python benchmarks/gpu_smoke.py --tiny --out "$OUTDIR" --ops layer_norm group_norm_2d attention_decode
else
    stage smoke smoke 90 python benchmarks/gpu_smoke.py --out "$OUTDIR"
fi

# ----------------------------------------------------------------------------- 3 tests
# Fast files first: -x stops at the first failure, so the cheap checks report before the long ones.
FAST="tests/test_kernels_cuda.py tests/test_bias_leaky_relu.py tests/test_layer_norm.py \
tests/test_clip_grad.py tests/test_group_norm.py tests/test_batch_norm.py tests/test_linear_leaky_relu.py \
tests/test_attention_kernels.py tests/test_attention.py"
REST=$(ls tests/test_*.py | grep -v -F -x -f <(echo "$FAST" | tr ' ' '\n' | grep .) | tr '\n' ' ')
if [ "$DRY" = 1 ]; then
    stage tests tests 60 python -m pytest -q --collect-only -m gpu $FAST $REST
else
    stage tests tests 240 python -m pytest -q -x -m gpu -p no:cacheprovider $FAST $REST
fi

# ----------------------------------------------------------------------------- 3b cuda
# The cuda backend on the op tests, then compute-sanitizer memcheck / racecheck over every CUDA kernel
# (benchmarks/gpu_cuda_stage.sh; its own tests ran in stage 3, its timings come from the harness).
if [ "$DRY" != 1 ]; then
    stage cuda cuda 150 env CUDA_STAGE_TESTS=0 CUDA_STAGE_BENCH=0 OUT="$OUTDIR/cuda" bash benchmarks/gpu_cuda_stage.sh
fi

# ----------------------------------------------------------------------------- 4 core, 5 sweep
OPS=$(python -c "from fusedstab.bench import OPS; print(' '.join(o for o in OPS if o != 'attention'))")
if [ "$DRY" = 1 ]; then  # one tiny shape per op on CPU: the same flags, toy sizes
    for op in $OPS attention; do
        case "$op" in
            clip_grad_norm) bench "core-$op" core 60 "$op" --dtype fp32 --quick --modes norm clip --no-compile \
                --providers eager ;;
            train_step) bench "core-$op" core 60 "$op" --dtype fp32 --tiny --modes step --providers eager fusedstab-torch ;;
            *) bench "core-$op" core 60 "$op" --dtype fp32 --quick --modes fwd bwd --no-compile --n 64 \
                --size-mib 1 --providers eager fusedstab-torch ;;
        esac
    done
    for op in $OPS attention; do echo "sweep (dry run, not run): python -m fusedstab.bench --ops $op --dtype bf16"; done
    wanted sweep && record sweep ok 0 "dry run: commands printed, not run"
else
    for op in $OPS attention; do
        case "$op" in
            clip_grad_norm) bench "core-$op" core 60 "$op" --dtype bf16 --quick --modes norm clip ;;
            train_step) bench "core-$op" core 150 "$op" --dtype bf16 --modes step ;;  # one size per model
            attention) bench "core-$op" core 120 "$op" --dtype bf16 --quick --modes fwd bwd ;;
            *) bench "core-$op" core 60 "$op" --dtype bf16 --quick --modes fwd bwd ;;
        esac
    done
    for op in $OPS attention; do
        case "$op" in
            clip_grad_norm) bench "sweep-$op" sweep 120 "$op" --dtype bf16
                            bench "sweep-$op-fp32" sweep 120 "$op" --dtype fp32 ;;  # fp32 grads: the common case
            attention) bench "sweep-$op" sweep 400 "$op" --dtype bf16 ;;  # last: the longest op
            train_step) ;;  # one size per model: the core stage ran it
            *) bench "sweep-$op" sweep 150 "$op" --dtype bf16 ;;
        esac
    done
fi

summary
echo
cat "$SUMMARY"
for f in "$OUTDIR"/*.log; do grep -h "^wrote: " "$f" 2>/dev/null; done | sed 's/^/  /'
! grep -q -P '\t(FAILED)\t' "$OUTDIR/stages.tsv"

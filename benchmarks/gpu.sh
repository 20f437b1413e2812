#!/usr/bin/env bash
# The one command to run on a lent CUDA GPU:
#
#   bash benchmarks/gpu.sh            # -> benchmarks/results/<gpu>.json and a one-screen summary
#
# 1. correctness: every op on the Triton backend against its plain PyTorch reference, small shapes,
#    forward and backward, in bf16 (head dims 64 and 128), fp16 (128) and fp32 (64)
#    (benchmarks/gpu_check.py; one process each, so their kernels compile in parallel);
# 2. `diffaccel bench` on the GPU suite (bf16; Triton against dense SDPA and FlexAttention);
# 3. both merged into benchmarks/results/<gpu>.json (device, torch / triton versions, git commit),
#    and the summary printed.  Exit status 0 only if every check passed and every case ran.
#
# Runs from the checkout without installing it (the package is put on PYTHONPATH through links), so
# it works on a machine without network access as long as torch and triton are installed there.
# Environment: PYTHON (default python3); DIFFACCEL_COMMIT (the commit, for a copy without .git);
# DIFFACCEL_RESULTS (output folder, default benchmarks/results); GPU_SH_BENCH_ARGS (extra arguments
# of `diffaccel bench`, e.g. "--case flux-1k").
# --cpu: the same three steps on the CPU through Triton's interpreter with tiny shapes and one small
# benchmark case (tests/test_gpu_script.py runs it: it checks the script, not speed).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=cpu
elif [[ $# -gt 0 ]]; then
    echo "usage: bash benchmarks/gpu.sh [--cpu]" >&2
    exit 2
fi
PY=${PYTHON:-python3}
RESULTS=${DIFFACCEL_RESULTS:-benchmarks/results}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

"$PY" benchmarks/gpu_check.py shim "$WORK/site"
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [[ -z "${DIFFACCEL_COMMIT:-}" ]] && git rev-parse HEAD > /dev/null 2>&1; then
    DIFFACCEL_COMMIT=$(git rev-parse HEAD)
    [[ -z "$(git status --porcelain --untracked-files=no)" ]] || DIFFACCEL_COMMIT+="-dirty"
fi
export DIFFACCEL_COMMIT=${DIFFACCEL_COMMIT:-unknown}

if [[ $MODE == gpu ]]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu')"
    DEVICE=cuda
    CHECK_ARGS=()
    JOBS=(bf16:64 bf16:128 fp16:128 fp32:64)
    BENCH_ARGS=(--backend triton)
else
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEVICE=cpu
    CHECK_ARGS=(--quick)
    JOBS=(bf16:16 fp16:16 fp32:16)
    BENCH_ARGS=(--op linear --backend torch --repeat 1 --warmup 0 --no-baseline flex)
fi
# shellcheck disable=SC2206
BENCH_ARGS+=(${GPU_SH_BENCH_ARGS:-})
NAME=$("$PY" benchmarks/gpu_check.py name --device "$DEVICE")
echo "== diffaccel GPU run on $NAME (commit ${DIFFACCEL_COMMIT:0:12})"

echo "== 1/3 correctness (${JOBS[*]} as dtype:head_dim, in parallel)"
pids=()
for job in "${JOBS[@]}"; do
    "$PY" benchmarks/gpu_check.py correctness --device "$DEVICE" --dtype "${job%%:*}" --head-dim "${job##*:}" \
        "${CHECK_ARGS[@]}" --json "$WORK/correct-${job/:/-}.json" > "$WORK/correct-${job/:/-}.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for job in "${JOBS[@]}"; do
    log="$WORK/correct-${job/:/-}.log"
    grep -E "^FAIL" "$log" || true
    [[ -s "${log%.log}.json" ]] || { echo "correctness $job did not finish:"; tail -20 "$log"; }
done
echo "   ($((SECONDS - start)) s)"

echo "== 2/3 diffaccel bench (${BENCH_ARGS[*]})"
"$PY" -m diffaccel.cli bench --device "$DEVICE" "${BENCH_ARGS[@]}" --json "$WORK/bench.json" \
    > "$WORK/bench.log" 2>&1 || { status=1; tail -20 "$WORK/bench.log"; }
echo "   ($((SECONDS - start)) s)"

echo "== 3/3 results"
mkdir -p "$RESULTS"
if [[ -s "$WORK/bench.json" ]]; then
    shopt -s nullglob
    "$PY" benchmarks/gpu_check.py report --bench "$WORK/bench.json" --correctness "$WORK"/correct-*.json \
        --out "$RESULTS/$NAME.json" $([[ $MODE == cpu ]] && echo --cpu) || status=1
fi
echo "== done in $((SECONDS - start)) s, status $status"
exit $status

#!/usr/bin/env bash
# The project's GPU check: one command, at most 8 minutes on one H100/H200. Run it on the first GPU you get:
#   bash benchmarks/gpu_check.sh               # then read the summary table at the end
#   bash benchmarks/gpu_check.sh --dry-run     # CPU, about a minute: gpu_check.py's steps on the demo (CI runs it)
# In turn: the GPU and the versions; the kernel tests on the GPU (triton log-probs compiled, not interpreted;
# the flash varlen attention against sdpa);
# benchmarks/gpu_check.py, whether a real run works (SFT, WRPO preempted and resumed, loading, generation, the
# varlen self-check, tokens/s and MFU: its docstring); then the log-prob benchmark at Llama-3 scale in bf16
# (tokens 16384, hidden 4096, vocab 128256: naive, torch.compile of naive, chunked and triton, against the
# 6*tokens*hidden*vocab FLOP floor) and the WRPO step benchmark on a ~1.5B Llama (baseline against packing and
# shared prompts, tokens/s and MFU). Each part runs under a timeout cut to what is left of the 8 minutes (a part
# with under 30 s left is skipped, and says so); a part that fails does not stop the ones after it. The summary
# has a line per part and one per step of gpu_check.py. Exit 0 when no line is FAIL, else 1.
# Other arguments (--work_dir=DIR: keep gpu_check.py's outputs) go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-480}
DRY_RUN=0
for arg in "$@"; do [[ $arg == --dry-run ]] && DRY_RUN=1; done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
ROWS=()

part() {  # part NAME MAX_SECONDS COMMAND...: run COMMAND under a timeout, add its line to the summary
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    (( limit > BUDGET - SECONDS )) && limit=$(( BUDGET - SECONDS ))
    if (( limit < 30 )); then
        ROWS+=("| $name | SKIP | not run: the ${BUDGET} s budget is spent |")
        return
    fi
    echo; echo "+ $*"
    timeout -k 60 "$limit" "$@"
    rc=$?
    if (( rc == 0 )); then ROWS+=("| $name | PASS | $(( SECONDS - t0 )) s |")
    elif (( rc == 124 || rc == 137 )); then ROWS+=("| $name | FAIL | timed out after ${limit} s |")
    else ROWS+=("| $name | FAIL | exit $rc after $(( SECONDS - t0 )) s |"); fi
}

if (( ! DRY_RUN )); then
    part "nvidia-smi" 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    part "versions" 60 $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
    part "kernel tests" 120 $PY -m pytest -q tests/test_logps.py tests/test_varlen.py
fi
GPU_CHECK=$(( BUDGET - SECONDS < 330 ? BUDGET - SECONDS : 330 ))  # its steps stop 20 s before the part's timeout
part "gpu_check.py" $GPU_CHECK $PY -m benchmarks.gpu_check --summary="$TMP/steps.md" \
    --seconds=$(( GPU_CHECK - 20 )) "$@"
[[ -f $TMP/steps.md ]] && mapfile -t -O ${#ROWS[@]} ROWS < "$TMP/steps.md"  # its steps' lines
if (( ! DRY_RUN )); then
    part "log-prob benchmark" 120 $PY benchmarks/logps.py --dtype=bfloat16 --tokens=16384 --hidden=4096 \
        --vocab=128256 --repeats=5
    part "WRPO step benchmark" 240 $PY benchmarks/train_step.py --preset=gpu --repeats=1
fi

echo
echo "summary ($SECONDS s)"
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
printf '%s\n' "${ROWS[@]}" | grep -q '| FAIL |' && exit 1
exit 0

#!/usr/bin/env bash
# The project's GPU check: one script, under 8 minutes on one H100. Run it when a GPU is lent:
#   bash benchmarks/gpu_check.sh
# It runs the log-prob kernel tests on the real GPU (triton compiled, not interpreted), then the
# log-prob benchmark at Llama-3 scale in bf16 (tokens 16384, hidden 4096, vocab 128256): naive,
# torch.compile of naive, chunked and triton, against the 6*tokens*hidden*vocab FLOP floor; then
# the WRPO step benchmark on a ~1.2B Llama: baseline (a) against packing (b, with packed_sdpa and
# with transformers' sdpa) and the default (c, shared prompts), tokens/s and MFU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 180 $PY -m pytest -q tests/test_logps.py
timeout 300 $PY benchmarks/logps.py --dtype=bfloat16 --tokens=16384 --hidden=4096 --vocab=128256 --repeats=5
timeout 240 $PY benchmarks/train_step.py --preset=gpu --repeats=1

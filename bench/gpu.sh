#!/usr/bin/env bash
# The GPU benchmark in one short run (under 8 minutes) for a lent GPU machine: bench/gpu_bench.py at 768x768,
# 25 decoder steps, ours (fp16 / bf16, eager / torch.compile with CUDA graphs, batch 4) against diffusers (fp16),
# published architecture with random weights. Results go to $OUT (or /tmp/gpu_out): gpu_bench.json and the log.
# diffusers is not needed by the library; if the machine lacks it, put its wheel in .whl/ (see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available())"
timeout "${GPU_BENCH_TIMEOUT:-450}" python3 bench/gpu_bench.py --size "${SIZE:-768}" --steps "${STEPS:-25}" \
  --budget "${BUDGET:-360}" --json "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.log"

#!/usr/bin/env bash
# One GPU session (device tool): versions, CUDA correctness of every decode path, then gpu_bench.
# Needs .whl/ (fastapi, uvicorn, pydantic, llguidance... for python 3.12) and .gpu/tokenizer.
#   bench/gpu_check.sh [gpu_bench arguments...]
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== CUDA correctness: Triton kernel vs float64; sdpa / triton / graphs vs generate() =="
timeout 120 python3 bench/gpu_smoke.py --tokenizer .gpu/tokenizer --out /tmp/tiny-llama 2>&1 \
    | grep -v "it/s]" | tee "$OUT/smoke.log"

echo "== gpu_bench: batch 1 vs bandwidth bound; 256 x 1024/128 vs transformers CB =="
timeout "${GPU_BENCH_TIMEOUT:-400}" python3 bench/gpu_bench.py "$@" 2>&1 | grep -v "it/s]" \
    | tee "$OUT/gpu_bench.log"

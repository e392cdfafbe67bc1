#!/usr/bin/env bash
# One GPU session (device tool): versions, CUDA correctness of every decode path, then gpu_bench.
# Needs .whl/ (fastapi, uvicorn, pydantic, llguidance... for python 3.12) and .gpu/tokenizer.
#   HEARTH_COMMIT=$(git rev-parse --short HEAD) bench/gpu_check.sh [gpu_bench arguments...]
# (the commit is passed in: the device's copy of the tree may carry stale git metadata)
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
timeout 100 python3 bench/gpu_smoke.py --tokenizer .gpu/tokenizer --out /tmp/tiny-llama 2>&1 \
    | grep -v "it/s]" | tee "$OUT/smoke.log"

echo "== hearth serve on CUDA (defaults) =="
timeout 60 python3 -m hearth serve --model /tmp/tiny-llama --port 8000 > "$OUT/serve.log" 2>&1 &
SERVER=$!
timeout 50 python3 - <<'PY'
import json, time, urllib.request
for _ in range(90):
    try:
        if urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2).status == 200:
            break
    except Exception:
        time.sleep(0.5)
body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions",
                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
print(json.loads(urllib.request.urlopen(req, timeout=30).read())["usage"])
PY
kill -TERM $SERVER; wait $SERVER; echo "serve exit code $?"
grep -E "decode attention|ready|ERROR|Traceback" "$OUT/serve.log"

echo "== gpu_bench: batch 1 vs bandwidth bound; 256 x 1024/128 vs transformers CB =="
timeout "${GPU_BENCH_TIMEOUT:-400}" python3 bench/gpu_bench.py "$@" 2>&1 | grep -v "it/s]" \
    | tee "$OUT/gpu_bench.log"

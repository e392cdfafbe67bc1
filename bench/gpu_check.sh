#!/usr/bin/env bash
# One H200 device session, in priority order, ending within GPU_CHECK_BUDGET seconds (535):
#   a. versions, the GPU, the machine          d. 8B fp8: batch 1, 256 x 1024/128; fp8_check
#   b. correctness (gpu_smoke)                 e. 70B bf16 (dummy): batch 1, 64 x 1024/128, serve
#   c. 8B bf16: batch 1, 256 x 1024/128, CB    f. 70B fp8 (dummy): batch 1, 64 x 1024/128, serve
# Each section runs in its own process under its own timeout (the GPU is free again after it);
# one that fails or times out never stops the next; one that no longer fits is skipped and
# says so. Ends with one table (bench/gpu_summary.py over $OUT/results.jsonl).
# Needs .whl/ (fastapi, uvicorn, pydantic, llguidance... for python 3.12) and .gpu/tokenizer.
#   HEARTH_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh
# GPU_CHECK_PART=8b runs a-d, GPU_CHECK_PART=70b runs a, e, f (two calls back to back on a warm
# machine fit a 15-minute device lease better than one); default: all.
# (the commit is passed in: the device's copy of the tree may carry stale git metadata)
# Files in $OUT: check.log (everything), serve.log (the servers), results.jsonl, summary.txt.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-535}  # seconds from start to the end of the summary
RESERVE=15                       # the summary, and a killed section's 10 s of grace
CB_REQUESTS=${GPU_CB_REQUESTS:-64}  # transformers CB is slow (~230 tok/s): a subset of the 256
START=$SECONDS
RESULTS=$OUT/results.jsonl
SHAPES=/tmp/hearth-shapes
exec > >(tee -a "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TOKENIZERS_PARALLELISM=false HEARTH_COMMIT=${HEARTH_COMMIT:-unknown}

record() {  # record SECTION MEASURE VALUE: one JSON line for the summary
    python3 -c 'import json, sys; print(json.dumps(dict(section=sys.argv[1], measure=sys.argv[2],
value=sys.argv[3])))' "$1" "$2" "$3" >> "$RESULTS"
}

gpu_idle() {  # wait (10 s at most) until the last section's process has left the GPU
    local used
    for _ in $(seq 20); do
        used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
        [ "${used:-0}" -lt 2000 ] 2>/dev/null && return
        sleep 0.5
    done
    echo "note: GPU memory still in use: ${used:-?} MiB"
}

# section NAME MEASURE CAP MIN COMMAND...: COMMAND under a timeout of CAP seconds, cut to the
# time left; skipped when less than MIN seconds are left. Records "ok (N s)", "TIMEOUT",
# "FAILED rc=N" or "skipped".
section() {
    local name=$1 measure=$2 cap=$3 min=$4
    shift 4
    local left=$((BUDGET - RESERVE - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < min)); then
        echo "== $name: $measure SKIPPED (${left} s left, needs ${min} s)"
        record "$name" "$measure" "skipped: ${left} s left"
        return
    fi
    echo "== $name: $measure (timeout ${limit} s, $((SECONDS - START)) s so far) =="
    local began=$SECONDS rc
    # timeout signals its whole process group: the section's servers and children too.
    timeout -k 10 "$limit" bash -c '"$@"' section "$@"
    rc=$?
    local took=$((SECONDS - began)) state
    case $rc in
        0) state="ok" ;;
        124 | 137) state="TIMEOUT" ;;
        *) state="FAILED rc=$rc" ;;
    esac
    echo "== $name: $measure: $state after ${took} s"
    record "$name" "$measure" "$state (${took} s)"
    gpu_idle
}

bench() {  # bench LABEL GPU_BENCH_ARGS...
    local label=$1
    shift
    python3 bench/gpu_bench.py --label "$label" --json "$RESULTS" "$@"
}

serve() {  # serve LABEL HEARTH_SERVE_ARGS...
    local label=$1
    shift
    python3 bench/serve_check.py --label "$label" --log "$OUT/serve.log" --json "$RESULTS" \
        --ready-timeout 120 -- "$@"
}

export OUT RESULTS SHAPES
export -f record bench serve

# -- setup: the server's packages, the shapes' checkpoint dirs (config.json + tokenizer) --------
mkdir -p /tmp/site
export PYTHONPATH=/tmp/site:$PWD  # /tmp/site first: its hearth has engine/ and server/ mapped in
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl; then
    echo "wheels: install failed (every section needs pydantic)"
fi
# hearth itself, built from this checkout (hearth.engine lives in engine/: an install maps it).
# Without setuptools>=68 there, the same layout by hand: hearth/ with engine/ and server/ linked.
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .; then
    echo "hearth: install from the checkout failed; linking the checkout into /tmp/site/hearth"
    rm -rf /tmp/site/hearth && mkdir -p /tmp/site/hearth
    cp hearth/*.py hearth/models.yaml /tmp/site/hearth/
    ln -s "$PWD/engine" /tmp/site/hearth/engine && ln -s "$PWD/server" /tmp/site/hearth/server
fi
record setup commit "$HEARTH_COMMIT"
section setup "checkpoint dirs" 60 5 python3 bench/shapes.py "$SHAPES" --tokenizer .gpu/tokenizer

# -- a. versions, GPU, machine -----------------------------------------------------------------
versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
        --format=csv,noheader
    record setup GPU "$(nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader | head -1)"
    record setup versions "$(python3 -c 'import torch, transformers, triton; print("torch",
torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)')"
    record setup machine "$(python3 bench/machine.py)"
}
export -f versions
section setup versions 30 5 versions

PART=${GPU_CHECK_PART:-all}
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

# -- b. correctness: Triton kernel vs float64, every decode path vs generate() ----------------
if want 8b; then
section correctness "gpu_smoke (kernel vs float64, paths vs generate)" 75 30 \
    python3 bench/gpu_smoke.py --tokenizer .gpu/tokenizer --out /tmp/tiny-llama

# -- c. 8B bf16 (kernels measured by autotune: the CUDA side of issue 13) -----------------------
section "8B bf16" bench 180 60 bench "8B bf16" --shape llama-3.1-8b --requests 256 \
    --cb-requests "$CB_REQUESTS"

# -- d. 8B fp8 ---------------------------------------------------------------------------------
if [ -f engine/quantization/fp8.py ]; then
    if [ -f bench/fp8_check.py ]; then
        section "8B fp8" "fp8_check (fp8 vs bf16 logits)" 45 15 python3 bench/fp8_check.py
    fi
    section "8B fp8" bench 90 45 bench "8B fp8" --shape llama-3.1-8b --quantization fp8 \
        --requests 256 --cb-requests 0
else
    record "8B fp8" bench "skipped: no engine/quantization/fp8.py"
fi
fi

if want 70b; then
# 70B: the kernels without measuring (autotune off: Triton, graphs, fused), to save the lease.
# -- e/f. 70B bf16 and fp8: the benches first, then a chat request through hearth serve each --
# bf16: 131 GiB of weights, a few GiB of KV at gpu_memory_utilization 0.97
B70=(--shape llama-3.3-70b --requests 64 --cb-requests 0 --batch1-requests 1
    --max-batched-tokens 4096 --autotune off)
section "70B bf16" bench 150 60 bench "70B bf16" "${B70[@]}" --gpu-memory-utilization 0.97
if [ -f engine/quantization/fp8.py ]; then
    section "70B fp8" bench 120 45 bench "70B fp8" "${B70[@]}" --quantization fp8
    section "70B fp8" serve 60 35 serve "70B fp8" --model "$SHAPES/llama-3.3-70b" \
        --load-format dummy --quantization fp8 --autotune off
else
    record "70B fp8" bench "skipped: no engine/quantization/fp8.py"
fi
section "70B bf16" serve 75 40 serve "70B bf16" --model "$SHAPES/llama-3.3-70b" \
    --load-format dummy --gpu-memory-utilization 0.97 --autotune off
fi

echo "== summary ($((SECONDS - START)) s in all) =="
record setup "total s" "$((SECONDS - START))"
python3 bench/gpu_summary.py "$RESULTS" | tee "$OUT/summary.txt"
sleep 1  # let tee write the last lines

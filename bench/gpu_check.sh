#!/usr/bin/env bash
# The device check: stages under one time budget, only what fits the card, one table in $OUT.
#
#   bash bench/gpu_prepare.sh            # here, once: .whl/ (wheels) and .gpu/ (tokenizer, shapes)
#   HEARTH_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh           # first call
#   HEARTH_COMMIT=... GPU_CHECK_PART=70b bash bench/gpu_check.sh                  # second call
#
# Stage 0 (30 s at most) installs .whl/ into /tmp/site, imports hearth.server.app and the Triton
# kernels, prints the GPU's name, memory and driver, torch/triton/transformers versions, and
# exits non-zero at once on any failure. Then the part's stages, in priority order, each in its
# own process under its own timeout cut to the time left (GPU_CHECK_BUDGET s from the start,
# default 285): one that fails or times out never stops the next, one that no longer fits or
# that the card cannot hold is skipped, and every stage leaves one row in the table.
#   first (default; fits 300 s on an H100 80GB or an H200): kernels vs float64 and two tiny
#     engines (bench/gpu_smoke.py), 8B bf16 and 8B fp8 throughput with the bounds beside them
#     (bench/gpu_bench.py), one `hearth serve` chat (8B fp8 shape, random weights)
#   70b (a second call, on an H200): 70B fp8 bench and serve; 70B bf16 bench and serve only on
#     a card of >= 140 GiB (131.4 GiB of weights); on an 80 GiB card, 70B fp8 alone
#   all: both, under one budget of 570 s
# Dry run on a machine without a GPU (tests/contracts/test_gpu_check.py):
#   GPU_CHECK_FAKE_GPU="NVIDIA H100 80GB HBM3,81559,580.159.04" GPU_CHECK_DRY_RUN=1 \
#     GPU_CHECK_WHEELS=none bash bench/gpu_check.sh
# runs stage 0 for real (imports included) with that card, prints the plan, runs no stage.
# Knobs: GPU_CHECK_PYTHON (python3), GPU_CHECK_ASSETS (.gpu), GPU_CHECK_WHEELS (.whl; "none": use the environment as it
# is), GPU_CHECK_SITE (/tmp/site), GPU_CB_REQUESTS (0: transformers CB baseline off).
# Files in $OUT: check.log (everything), serve.log (the servers), results.jsonl, summary.txt.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
PART=${GPU_CHECK_PART:-first}
case $PART in
    first | 70b) DEFAULT_BUDGET=285 ;;
    all) DEFAULT_BUDGET=570 ;;
    *) echo "GPU_CHECK_PART: first, 70b or all, not '$PART'" >&2 && exit 2 ;;
esac
BUDGET=${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}  # seconds from start to the end of the summary
STAGE0_LIMIT=${GPU_CHECK_STAGE0_S:-30}
RESERVE=10                                  # the summary, and a killed stage's grace
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
FAKE=${GPU_CHECK_FAKE_GPU:-}               # "NAME,MEMORY MiB,DRIVER": no nvidia-smi, no CUDA
DRY=${GPU_CHECK_DRY_RUN:-0}
CB_REQUESTS=${GPU_CB_REQUESTS:-0}
START=$SECONDS
RESULTS=$OUT/results.jsonl
ASSETS=${GPU_CHECK_ASSETS:-.gpu}            # tokenizer/ and shapes/ (bench/gpu_prepare.sh)
TOKENIZER=$ASSETS/tokenizer
SHAPES=$ASSETS/shapes
: >"$RESULTS"
exec > >(tee -a "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TOKENIZERS_PARALLELISM=false HEARTH_COMMIT=${HEARTH_COMMIT:-unknown}
export HEARTH_CACHE_DIR=${HEARTH_CACHE_DIR:-/tmp/hearth-cache}

record() { # record SECTION MEASURE VALUE: one JSON line for the table
    "$PY" -c 'import json, sys; print(json.dumps(dict(section=sys.argv[1], measure=sys.argv[2],
value=sys.argv[3])))' "$1" "$2" "$3" >>"$RESULTS"
}

summary() {
    echo "== summary ($((SECONDS - START)) s in all) =="
    record setup "total s" "$((SECONDS - START))"
    "$PY" bench/gpu_summary.py "$RESULTS" | tee "$OUT/summary.txt"
    sleep 1 # let tee write the last lines
}

# -- stage 0: install, import, the card; any failure ends the run at once ------------------------
fail0() { # fail0 WHAT: stage 0's row, the table, exit 1
    echo "== stage 0: FAILED: $1 ($((SECONDS - START)) s)"
    record "stage 0" "install, imports, GPU" "FAILED: $1"
    summary
    exit 1
}
left0() { echo $((STAGE0_LIMIT - (SECONDS - START))); }
step0() { # step0 WHAT COMMAND...: COMMAND within stage 0's time left, or fail0 WHAT
    local what=$1 left
    shift
    left=$(left0)
    ((left > 0)) || fail0 "$what: no time left of ${STAGE0_LIMIT} s"
    timeout -k 2 "$left" "$@" || fail0 "$what (rc=$?)"
}
echo "== stage 0: install, imports, GPU (at most ${STAGE0_LIMIT} s); part $PART, budget ${BUDGET} s"
record setup commit "$HEARTH_COMMIT"
[ -d "$TOKENIZER" ] || fail0 "no $TOKENIZER: run bench/gpu_prepare.sh and carry .gpu"
if [ "$WHEELS" != none ]; then
    compgen -G "$WHEELS/*.whl" >/dev/null || fail0 "no wheels in $WHEELS: run bench/gpu_prepare.sh"
    mkdir -p "$SITE"
    step0 "wheels: install into $SITE" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export GPU_CHECK_FAKE_GPU=$FAKE GPU_CHECK_VERSIONS=$OUT/versions.txt
step0 "imports (hearth.server.app, the kernels, torch/triton/transformers)" "$PY" -c '
import os, sys
import hearth.server.app  # the server: fastapi, pydantic, uvicorn, ... from the wheels
import hearth.engine.kernels.triton_attention, hearth.engine.kernels.fused_ops
import hearth.engine.kernels.fp8_kernels, hearth.engine.quantization.fp8
import llguidance, jsonschema, gguf
import torch, triton, transformers
line = (f"torch {torch.__version__} triton {triton.__version__} transformers "
        f"{transformers.__version__} python {sys.version.split()[0]}")
print("versions:", line)
open(os.environ["GPU_CHECK_VERSIONS"], "w").write(line)
if not os.environ["GPU_CHECK_FAKE_GPU"]:
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    free, total = torch.cuda.mem_get_info()
    print(f"torch: {torch.cuda.get_device_name()}, {total / 2**30:.1f} GiB, {free / 2**30:.1f} free")
'
record setup versions "$(cat "$GPU_CHECK_VERSIONS")"
if [ -n "$FAKE" ]; then
    GPU_LINE=$FAKE
    echo "GPU (faked by GPU_CHECK_FAKE_GPU): $GPU_LINE"
else
    GPU_LINE=$(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader,nounits | head -1) || fail0 "nvidia-smi"
    echo "GPU: $GPU_LINE"
fi
IFS=, read -r GPU_NAME GPU_MIB GPU_DRIVER <<<"$GPU_LINE"
GPU_MIB=${GPU_MIB// /}
[[ $GPU_MIB =~ ^[0-9]+$ ]] || fail0 "GPU memory unreadable: '$GPU_LINE'"
GPU_GIB=$((GPU_MIB / 1024))
record setup GPU "$GPU_NAME, $GPU_MIB MiB, driver ${GPU_DRIVER# }"
if [ ! -d "$SHAPES/llama-3.1-8b" ]; then # not carried: written here from the tokenizer
    SHAPES=/tmp/hearth-shapes
    step0 "shapes' checkpoint dirs" "$PY" bench/shapes.py "$SHAPES" --tokenizer "$TOKENIZER"
fi
if [ -z "$FAKE" ]; then
    record setup machine "$("$PY" bench/machine.py)"
fi
record "stage 0" "install, imports, GPU" "ok ($((SECONDS - START)) s)"
echo "== stage 0: ok after $((SECONDS - START)) s"

# -- the stages -----------------------------------------------------------------------------
gpu_idle() { # wait (10 s at most) until the last stage's process has left the GPU
    [ -n "$FAKE" ] && return
    local used
    for _ in $(seq 20); do
        used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
        [ "${used:-0}" -lt 2000 ] 2>/dev/null && return
        sleep 0.5
    done
    echo "note: GPU memory still in use: ${used:-?} MiB"
}

# stage NAME MEASURE CAP MIN NEED_GIB COMMAND...: COMMAND under a timeout of CAP seconds, cut to
# the time left; skipped when less than MIN seconds are left or the card has < NEED_GIB GiB.
# Records "ok (N s)", "TIMEOUT", "FAILED rc=N", "skipped: ..." or, in a dry run, "planned".
stage() {
    local name=$1 measure=$2 cap=$3 min=$4 need=$5
    shift 5
    if ((GPU_GIB < need)); then
        echo "== $name: $measure SKIPPED: needs >= $need GiB, the card has $GPU_GIB GiB"
        record "$name" "$measure" "skipped: needs >= $need GiB (card: $GPU_GIB GiB)"
        return
    fi
    if [ "$DRY" = 1 ]; then
        echo "== $name: $measure: planned (timeout $cap s, needs >= $need GiB)"
        record "$name" "$measure" "planned (timeout $cap s)"
        return
    fi
    local left=$((BUDGET - RESERVE - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < min)); then
        echo "== $name: $measure SKIPPED (${left} s left, needs ${min} s)"
        record "$name" "$measure" "skipped: ${left} s left"
        return
    fi
    echo "== $name: $measure (timeout ${limit} s, $((SECONDS - START)) s so far) =="
    local began=$SECONDS rc state
    # timeout signals its whole process group: the stage's servers and children too.
    timeout -k 5 "$limit" bash -c '"$@"' stage "$@" # bash: COMMAND may be bench or serve
    rc=$?
    case $rc in
        0) state="ok" ;;
        124 | 137) state="TIMEOUT" ;;
        *) state="FAILED rc=$rc" ;;
    esac
    echo "== $name: $measure: $state after $((SECONDS - began)) s"
    record "$name" "$measure" "$state ($((SECONDS - began)) s)"
    gpu_idle
}

bench() { # bench LABEL GPU_BENCH_ARGS...
    local label=$1
    shift
    "$PY" bench/gpu_bench.py --label "$label" --json "$RESULTS" "$@"
}

serve() { # serve LABEL HEARTH_SERVE_ARGS...
    local label=$1
    shift
    "$PY" bench/serve_check.py --label "$label" --log "$OUT/serve.log" --json "$RESULTS" \
        --ready-timeout 90 -- "$@"
}

export PY OUT RESULTS
export -f bench serve

# The first call: ~35 + 60 + 60 + 45 s expected of the caps' 60 + 75 + 70 + 50.
if [ "$PART" != 70b ]; then
    stage correctness "kernels vs float64; tiny engines vs generate()" 60 30 0 \
        "$PY" bench/gpu_smoke.py --tokenizer "$TOKENIZER" --out /tmp/tiny-llama
    B8=(--shape llama-3.1-8b --requests 256 --cb-requests "$CB_REQUESTS")
    stage "8B bf16" bench 75 45 40 bench "8B bf16" "${B8[@]}"
    stage "8B fp8" bench 70 40 40 bench "8B fp8" "${B8[@]}" --quantization fp8
    stage "8B fp8" "serve: one chat" 50 30 40 serve "8B fp8" --model "$SHAPES/llama-3.1-8b" \
        --load-format dummy --quantization fp8 --autotune off
fi

# The second call (70B): autotune off (Triton, graphs, fused) to spare the lease.
if [ "$PART" != first ]; then
    B70=(--shape llama-3.3-70b --requests 64 --cb-requests 0 --batch1-requests 1
        --max-batched-tokens 4096 --autotune off)
    # fp8: 67.7 GiB of weights; at 0.95 an 80 GiB card keeps ~7 GiB for KV and activations.
    stage "70B fp8" bench 80 45 76 bench "70B fp8" "${B70[@]}" --quantization fp8 \
        --gpu-memory-utilization 0.95
    stage "70B fp8" "serve: one chat" 55 35 76 serve "70B fp8" --model "$SHAPES/llama-3.3-70b" \
        --load-format dummy --quantization fp8 --gpu-memory-utilization 0.95 --autotune off
    # bf16: 131.4 GiB of weights; 0.97 of an H200 leaves ~4 GiB of KV (~13k tokens).
    stage "70B bf16" bench 80 50 140 bench "70B bf16" "${B70[@]}" --gpu-memory-utilization 0.97
    stage "70B bf16" "serve: one chat" 55 40 140 serve "70B bf16" \
        --model "$SHAPES/llama-3.3-70b" --load-format dummy --gpu-memory-utilization 0.97 \
        --autotune off
fi

summary

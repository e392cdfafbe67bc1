"""GPU benchmark of one model shape: batch-1 decode against the bandwidth bound, then N x 1024/128
(against transformers' continuous batching where asked).

    python bench/gpu_bench.py                  # Llama-3.1-8B shape, bf16, 256 x 1024/128 vs CB
    python bench/gpu_bench.py --shape llama-3.3-70b --requests 64 --cb-requests 0 \\
        --gpu-memory-utilization 0.97         # 70B bf16 on one H200
    python bench/gpu_bench.py --quantization fp8 ...    # fp8 decoder layers (quantization/fp8.py)
    python bench/gpu_bench.py --small          # CPU: a tiny shape (checks the bench itself)

No downloads: the model is built on the device with random weights (engine/loading/dummy.py, what
`load_format: dummy` does). Prints one table; with --json, one JSON line per figure as well
(bench/gpu_summary.py gathers them into the device check's table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.engine_bench import (
    SHAPES,
    _NullTokenizer,
    bench_hearth,
    bench_transformers_cb,
    free_device_memory,
    make_prompts,
    plain_model,
    sync,
)
from bench.gpu_bounds import bandwidth_bound_tok_s, compute_bound_tok_s, matmul_rate
from bench.machine import describe
from hearth.engine.config import ModelConfig
from hearth.engine.kv_cache import KVCacheSpec
from hearth.engine.loading.dummy import build_dummy_model, fp8_quantizer, model_bytes
from hearth.engine.loading.loader import LoadedModel, configure_cpu_threads
from hearth.engine.loading.sources import resolve_source

# Issue 27's targets, each beside the same run's bound: (shape, quantization) -> target.
THROUGHPUT_TARGETS = {("llama-3.1-8b", "none"): 3500.0, ("llama-3.1-8b", "fp8"): 6000.0}
BATCH1_TARGETS = {  # fraction of the batch-1 bandwidth bound
    ("llama-3.1-8b", "none"): 0.80,
    ("llama-3.3-70b", "fp8"): 0.75,
}
VS_CB_TARGET = 1.5


def rates(device: str, quantization: str) -> tuple[float | None, float | None]:
    """Measured matmul FLOP/s: (the model's dtype: bf16 on CUDA, fp32 on CPU; the projections'
    dtype); None where it cannot run."""
    cuda = device.startswith("cuda")
    try:
        bf16 = matmul_rate(device, "bf16" if cuda else "fp32", 8192 if cuda else 512)
    except Exception:  # the table then shows no compute bound
        traceback.print_exc()
        return None, None
    if quantization != "fp8":
        return bf16, bf16
    try:
        return bf16, matmul_rate(device, "fp8", 8192 if cuda else 512)
    except Exception:
        traceback.print_exc()
        return bf16, None


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s, from timed tensor copies (a read and a write each)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    free_device_memory(device)
    return 2 * nbytes * repeats / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the model: parameters and buffers (fp8 scales included)."""
    return model_bytes(model)


def workload(args: argparse.Namespace, **values) -> argparse.Namespace:
    """engine_bench's arguments for one workload; kernels unset: the engine's defaults."""
    base = dict(
        source=None,
        shape=args.shape,
        device=args.device,
        kv_memory=args.kv_memory,
        max_batched_tokens=args.max_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        autotune=args.autotune,
        sequential=0,
        repeat=1,
    )
    return argparse.Namespace(**{**base, **values})


def build(args: argparse.Namespace) -> tuple[LoadedModel, float]:
    """The shape's model with random weights on the device (fp8 layers when asked), and the
    seconds the build took."""
    from transformers import LlamaConfig

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    quantize = fp8_quantizer() if args.quantization == "fp8" else None
    started = time.perf_counter()
    model = build_dummy_model(LlamaConfig(**SHAPES[args.shape]), args.device, dtype, quantize)
    seconds = time.perf_counter() - started
    max_len = args.prompt_len + args.output_len + 16
    engine = {"gpu_memory_utilization": args.gpu_memory_utilization, "autotune": args.autotune}
    config = ModelConfig(
        id=args.shape,
        source=args.shape,
        device=args.device,
        max_model_len=max_len,
        load_format="dummy",
        quantization="fp8" if quantize else "none",
        engine=engine,
    )
    loaded = LoadedModel(
        config,
        resolve_source("a/b"),
        "",
        model,
        _NullTokenizer(),
        torch.device(args.device),
        dtype,
        max_len,
    )
    return loaded, seconds


class Report:
    """Rows of the printed table, each also written as a JSON line to --json."""

    def __init__(self, label: str, json_path: str | None) -> None:
        self.label, self.json_path = label, json_path
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(
        self, measure: str, value: float | str, baseline: str = "", ratio: str = "", target=""
    ) -> None:
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        self.rows.append((measure, shown, baseline, ratio, target))
        if self.json_path:
            line = dict(section=self.label, measure=measure, value=value, baseline=baseline)
            line.update(ratio=ratio, target=target)
            with open(self.json_path, "a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")

    def print(self) -> None:
        rows = [("measure", "value", "baseline", "ratio", "target"), *self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shape on CPU, seconds")
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch1-tokens", type=int, default=128, help="prompt and output")
    parser.add_argument("--batch1-requests", type=int, default=2, help="run one at a time")
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-memory", default=None, help="KV budget; default: GPU memory share")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument(
        "--autotune",
        default="auto",
        choices=["auto", "off", "remeasure"],
        help="engine.autotune of every engine built (auto: measured once per shape and settings)",
    )
    parser.add_argument(
        "--cb-requests",
        type=int,
        default=None,
        help="transformers CB on the first N requests (default: all; 0: skip), and hearth on "
        "the same N when N is fewer than --requests",
    )
    parser.add_argument("--label", default=None, help="section name in the JSON lines")
    parser.add_argument("--json", default=None, metavar="PATH", help="append JSON lines here")
    args = parser.parse_args()
    print(describe(), flush=True)  # the machine every figure below was measured on
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("hearth").setLevel(logging.INFO)  # the autotune and KV lines
    args.device = "cuda"
    if args.small:
        args.shape, args.device = "tiny", "cpu"
        args.requests, args.prompt_len, args.output_len, args.batch1_tokens = 8, 64, 16, 16
        args.max_batched_tokens, args.kv_memory = 512, "64MiB"
        configure_cpu_threads()
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU check")
    if args.cb_requests is None:  # --small: CB on half, so that the subset path runs too
        args.cb_requests = args.requests // 2 if args.small else args.requests
    args.cb_requests = min(args.cb_requests, args.requests)
    args.label = args.label or f"{args.shape} {'fp8' if args.quantization == 'fp8' else 'bf16'}"
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    report = Report(args.label, args.json)
    # Before the model: a 70B bf16 leaves no room for the copy's buffers.
    bandwidth = copy_bandwidth(args.device, 256 << 20 if args.small else 4 << 30)
    bf16_rate, linear_rate = rates(args.device, args.quantization)
    free_device_memory(args.device)
    loaded, build_seconds = build(args)
    weights = weight_bytes(loaded.model)
    report.add("model build s (random weights on the device)", build_seconds)
    report.add("weights GiB", f"{weights / 2**30:.2f}")
    big = workload(
        args,
        requests=args.requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        concurrency=args.requests,
    )
    one = workload(
        args,
        requests=args.batch1_requests,
        prompt_len=args.batch1_tokens,
        output_len=args.batch1_tokens,
        concurrency=1,
        kv_memory=args.kv_memory or "1GiB",  # a few blocks: the rest stays free for the next
    )
    vocab = loaded.model.config.vocab_size
    # Bytes a batch-1 decode step reads: every weight, and the KV of the average context.
    per_token = KVCacheSpec.from_model(loaded.model, loaded.dtype).bytes_per_token
    kv = per_token * int(args.batch1_tokens * 1.5)
    bound = bandwidth_bound_tok_s(bandwidth, weights, kv)
    report.add("copy bandwidth GB/s (read + write)", bandwidth / 1e9)
    shape = SHAPES[args.shape]
    compute = None
    if bf16_rate:
        kind = "bf16" if args.device.startswith("cuda") else "fp32"
        report.add(f"{kind} matmul TFLOP/s (measured)", f"{bf16_rate / 1e12:.3g}")
    if args.quantization == "fp8" and linear_rate:
        report.add("fp8 matmul TFLOP/s (measured, _scaled_mm)", f"{linear_rate / 1e12:.3g}")
    if bf16_rate and linear_rate:
        compute = compute_bound_tok_s(
            shape, args.prompt_len, args.output_len, bf16_rate, linear_rate
        )
    key = (args.shape, args.quantization)
    prompts = make_prompts(big, vocab)
    stages = [("batch1", one, make_prompts(one, vocab)), ("many", big, prompts)]
    same = None
    if 0 < args.cb_requests < args.requests:  # hearth on CB's subset: the same workload
        same = workload(
            args,
            requests=args.cb_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            concurrency=args.cb_requests,
        )
        stages.append(("same", same, prompts[: args.cb_requests]))
    workload_name = f"{args.requests} x {args.prompt_len}/{args.output_len}"
    results = {}
    for name, ns, stage_prompts in stages:
        try:  # a failing stage (out of memory, say) leaves the others
            results[name] = bench_hearth(loaded, stage_prompts, ns)
        except Exception:  # reported; the table shows what did run
            traceback.print_exc()
            continue
        finally:
            free_device_memory(args.device)
        r = results[name]
        print(
            f"partial: {name}: {r.tok_s:.1f} tok/s, decode phase {r.decode_tok_s or 0:.1f}, "
            f"TTFT p50 {r.ttft(0.5):.2f} s, engine build {r.setup_seconds:.1f} s, KV cache "
            f"{r.kv_capacity_tokens} tokens",
            flush=True,
        )
        # Rows as soon as they are measured: a run stopped later still reports them.
        if name == "batch1":
            report.add(
                f"batch-1 decode tok/s ({args.batch1_tokens}/{args.batch1_tokens})",
                r.tok_s,
                f"bound {bound:.1f}",
                f"{r.tok_s / bound:.0%}",
                f">= {BATCH1_TARGETS[key]:.0%} of bound" if key in BATCH1_TARGETS else "",
            )
        elif name == "many":
            target = f">= {THROUGHPUT_TARGETS[key]:.0f}" if key in THROUGHPUT_TARGETS else ""
            report.add(
                f"{workload_name} out tok/s",
                r.tok_s,
                f"compute bound {compute:.0f}" if compute else "",
                f"{r.tok_s / compute:.0%}" if compute else "",
                target,
            )
            report.add(f"{workload_name} decode phase out tok/s", r.decode_tok_s or 0.0)
            report.add(
                f"{workload_name} TTFT p50 / p99 s", f"{r.ttft(0.5):.2f} / {r.ttft(0.99):.2f}"
            )
            report.add(f"{workload_name} KV cache tokens", str(r.kv_capacity_tokens))
    # The baseline last: hearth's engines have freed the GPU memory they sized for themselves.
    if args.cb_requests:
        cb_args = same or big
        cb_name = f"{args.cb_requests} x {args.prompt_len}/{args.output_len}"
        try:
            cb = bench_transformers_cb(plain_model(loaded), prompts[: args.cb_requests], cb_args)
        except Exception:  # the table then has no baseline
            traceback.print_exc()
            cb = None
        free_device_memory(args.device)
        ours = results.get("same" if same is not None else "many")
        if cb is not None:
            print(f"partial: transformers CB {cb.tok_s:.1f} tok/s", flush=True)
            report.add(
                f"{cb_name} out tok/s, transformers CB (TTFT p50 {cb.ttft(0.5):.2f} s)", cb.tok_s
            )
        if cb is not None and ours is not None:
            report.add(
                f"{cb_name} out tok/s, hearth vs CB (same prompts, same run)",
                ours.tok_s,
                f"CB {cb.tok_s:.1f}",
                f"{ours.tok_s / cb.tok_s:.2f}x",
                f">= {VS_CB_TARGET}x CB",
            )
    # A copy of the tree on a GPU machine may carry stale git metadata: the launcher can say.
    commit = (
        os.environ.get("HEARTH_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"{args.label}: device {device}; torch {torch.__version__}; commit {commit}; shape "
        f"{args.shape} ({weights / 1e9:.2f} GB of weights, {loaded.dtype}, quantization "
        f"{args.quantization}); {time.perf_counter() - started:.0f} s in all"
    )
    report.print()


if __name__ == "__main__":
    main()

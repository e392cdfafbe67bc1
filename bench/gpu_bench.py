"""GPU benchmark: batch-1 decode against the bandwidth bound, and 256 x 1024/128 vs transformers CB.

    python bench/gpu_bench.py            # one H100/H200: Llama-3.1-8B shape, random bf16, < 8 min
    python bench/gpu_bench.py --small    # CPU: a tiny shape and workload (checks the bench itself)

No downloads: the model is built from a config with random weights. Prints one table with the
targets of issue 6 and each figure's same-run baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_bench import (
    bench_hearth,
    bench_transformers_cb,
    free_device_memory,
    load,
    make_prompts,
    plain_model,
    sync,
)
from engine.loader import configure_cpu_threads
from engine.runner import kv_bytes_per_token

TARGETS = {"batch1_tok_s": 150.0, "throughput_tok_s": 5000.0, "vs_cb": 1.5}


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


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def workload(args: argparse.Namespace, **values) -> argparse.Namespace:
    """engine_bench's arguments for one workload."""
    base = dict(
        source=None,
        shape=args.shape,
        device=args.device,
        kv_memory=args.kv_memory,
        max_batched_tokens=args.max_batched_tokens,
        sequential=0,
        repeat=1,
    )
    return argparse.Namespace(**{**base, **values})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shape on CPU, seconds")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch1-tokens", type=int, default=128, help="prompt and output")
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-memory", default=None)
    parser.add_argument("--skip-cb", action="store_true")
    parser.add_argument(
        "--kernels",
        default="sdpa,triton+graphs,triton+graphs+fused",
        help="variants (comma list): decode kernel sdpa or triton, +graphs (CUDA graphs), "
        "+fused (Triton RMSNorm and SiLU * up); only sdpa runs without CUDA and Triton",
    )
    args = parser.parse_args()
    args.shape, args.device = "llama-3.1-8b", "cuda"
    if args.small:
        args.shape, args.device = "tiny", "cpu"
        args.requests, args.prompt_len, args.output_len, args.batch1_tokens = 8, 64, 16, 16
        args.max_batched_tokens, args.kv_memory = 512, "64MiB"
        configure_cpu_threads()
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU check")
    started = time.perf_counter()
    big = workload(
        args,
        requests=args.requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        concurrency=args.requests,
    )
    loaded = load(big)
    one = workload(
        args,
        requests=2,
        prompt_len=args.batch1_tokens,
        output_len=args.batch1_tokens,
        concurrency=1,
    )
    vocab = loaded.model.config.vocab_size
    bandwidth = copy_bandwidth(args.device, 256 << 20 if args.small else 4 << 30)
    weights = weight_bytes(loaded.model)
    # Bytes a batch-1 decode step reads: every weight, and the KV of the average context.
    kv = kv_bytes_per_token(loaded.model, loaded.dtype) * int(args.batch1_tokens * 1.5)
    bound = bandwidth / (weights + kv)
    # The engine as configured by default, then with the Triton decode kernel where it can run.
    kernels = args.kernels.split(",")
    if args.device != "cuda" or not _has_triton():
        kernels = [kernel for kernel in kernels if kernel == "sdpa"]
    prompts = make_prompts(big, vocab)
    batch1, hearth = {}, {}
    for kernel in kernels:
        parts = kernel.split("+")
        for ns in (one, big):
            ns.decode_kernel = parts[0]
            ns.cuda_graphs = "graphs" in parts
            ns.fused_kernels = "fused" in parts
        try:  # a variant that fails (a kernel that does not compile, say) leaves the others
            batch1[kernel] = bench_hearth(loaded, make_prompts(one, vocab), one)
            free_device_memory(args.device)
            hearth[kernel] = bench_hearth(loaded, prompts, big)
        except Exception:  # reported, and the table shows what did run
            traceback.print_exc()
            batch1.pop(kernel, None)
            continue
        finally:
            free_device_memory(args.device)
        many = hearth[kernel]
        print(
            f"partial: {kernel}: batch 1 {batch1[kernel].tok_s:.1f} tok/s (bound {bound:.1f}); "
            f"{args.requests} requests {many.tok_s:.1f} tok/s, decode phase "
            f"{many.decode_tok_s or 0:.1f} tok/s, TTFT p50 {many.ttft(0.5):.2f} s; "
            f"engine builds {batch1[kernel].setup_seconds:.1f} s / {many.setup_seconds:.1f} s",
            flush=True,
        )
    # The baseline last: hearth's engines have freed the GPU memory they sized for themselves.
    cb = None
    if not args.skip_cb:
        try:
            cb = bench_transformers_cb(plain_model(loaded), prompts, big)
            print(f"partial: transformers CB {cb.tok_s:.1f} tok/s", flush=True)
        except Exception:  # the table then has no baseline column
            traceback.print_exc()
        free_device_memory(args.device)
    # A copy of the tree on a GPU machine may carry stale git metadata: the launcher can say.
    commit = (
        os.environ.get("HEARTH_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"device {device}; torch {torch.__version__}; commit {commit}; shape {args.shape} "
        f"({weights / 1e9:.2f} GB of weights, {loaded.dtype}); copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; {time.perf_counter() - started:.0f} s in all"
    )
    rows = [("measure", "value", "baseline", "ratio", "target")]
    for kernel in hearth:
        tag = "" if kernel == "sdpa" else f" [{kernel}]"
        one_s, many = batch1[kernel], hearth[kernel]
        rows += [
            (
                f"batch-1 decode tok/s ({args.batch1_tokens}/{args.batch1_tokens}){tag}",
                f"{one_s.tok_s:.1f}",
                f"bound {bound:.1f}",
                f"{one_s.tok_s / bound:.0%}",
                f">= {TARGETS['batch1_tok_s']:.0f}",
            ),
            (
                f"{args.requests} x {args.prompt_len}/{args.output_len} out tok/s{tag}",
                f"{many.tok_s:.1f}",
                f"CB {cb.tok_s:.1f}" if cb else "-",
                f"{many.tok_s / cb.tok_s:.2f}x" if cb else "-",
                f">= {TARGETS['throughput_tok_s']:.0f}, >= {TARGETS['vs_cb']}x CB",
            ),
            (
                f"decode phase out tok/s{tag}",
                f"{many.decode_tok_s or 0:.1f}",
                "",
                "",
                "",
            ),
            (
                f"TTFT p50 / p99 s{tag}",
                f"{many.ttft(0.5):.2f} / {many.ttft(0.99):.2f}",
                f"CB {cb.ttft(0.5):.2f} / {cb.ttft(0.99):.2f}" if cb else "-",
                "",
                "",
            ),
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()

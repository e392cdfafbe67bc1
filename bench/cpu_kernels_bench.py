"""The CPU kernels per ISA variant against PyTorch's own CPU paths, on this machine.

    python bench/cpu_kernels_bench.py [--repeats 7] [--variants avx512,avx2] [--threads 1]

Prints bench.machine.describe(), then two tables of median times over interleaved repeats (each
repeat times every candidate once, in turn, so machine noise hits them alike):
- linear: F.linear (MKL) vs engine.kernels.cpu_kernels.linear per variant over packed weights, for
  SmolLM2-135M's linear shapes at M = 1, 8, 32, 64, 256 rows. Each call reads a different copy
  of the weight (copies spanning more than the last-level cache), as a decode step reads each
  layer's weights from memory;
- paged decode: the PyTorch path (engine/kernels/attention.py: gather the blocks, SDPA) vs
  engine.kernels.cpu_kernels.paged_decode per variant, SmolLM2's attention (9 heads, 3 KV heads,
  head dim 64, block size 16) at batch 1 and 32, contexts of ~100 tokens.
Ratios are the PyTorch time over the kernel's: above 1, the kernel is faster. On a shared
machine, `--threads 1 --clock cpu` times CPU time instead of wall time: other jobs then barely
move the figures (with 2+ threads, a descheduled thread stalls the others at each barrier).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.machine import describe
from hearth.engine.kernels import cpu_kernels
from hearth.engine.kernels.attention import _decode_attention

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64, vocab 49152 (tied).
LINEAR_SHAPES = [  # name, K (in), N (out)
    ("q/k/v fused", 576, 960),
    ("o_proj", 576, 576),
    ("gate/up fused", 576, 3072),
    ("down_proj", 1536, 576),
    ("lm_head", 576, 49152),
]
ROWS = (1, 8, 32, 64, 256)
STREAM_BYTES = 96 << 20  # weight copies per shape: more than a 32 MiB L3, so calls read memory


CLOCKS = {  # seconds
    "wall": time.perf_counter,
    # CPU time of the whole process: with one thread, the time the call ran on the CPU, whatever
    # else the machine was running (a shared machine descheduling us does not count)
    "cpu": time.process_time,
}


def median_ms(
    candidates: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median milliseconds per call of each candidate, repeats interleaved. Each sample loops a
    candidate enough times to last ~5 ms (timer noise), after one warm-up call."""
    loops = {}
    for name, fn in candidates.items():
        fn()
        start = clock()
        fn()
        loops[name] = max(1, math.ceil(0.005 / max(clock() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = clock()
            for _ in range(loops[name]):
                fn()
            samples[name].append((clock() - start) * 1e3 / loops[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def rotating(items: list) -> Callable[[], object]:
    """Each call returns the next item, cycling."""
    state = {"i": -1}

    def next_item() -> object:
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def bench_linear(variants: list[str], repeats: int, clock: Callable[[], float]) -> None:
    print("\n## linear: F.linear (MKL) vs the kernel, ms per call (ratio = MKL / kernel)\n")
    print("| shape | K x N | M | F.linear | " + " | ".join(variants) + " |")
    print("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in variants) + " |")
    gen = torch.Generator().manual_seed(0)
    for name, k, n in LINEAR_SHAPES:
        copies = max(1, STREAM_BYTES // (k * n * 4))
        weights = [torch.randn(n, k, generator=gen) / k**0.5 for _ in range(copies)]  # [N, K]
        packed = [cpu_kernels.pack_weight(w) for w in weights]  # [N/16, K, 16]
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)  # [M, K]
            next_weight, next_packed = rotating(weights), rotating(packed)
            candidates: dict[str, Callable[[], object]] = {
                "F.linear": lambda x=x, w=next_weight: F.linear(x, w()),
            }
            for variant in variants:
                candidates[variant] = lambda x=x, p=next_packed, v=variant: cpu_kernels.linear(
                    x, p(), None, v
                )
            ms = median_ms(candidates, repeats, clock)
            cells = [f"{ms['F.linear']:.3f}"]
            cells += [f"{ms[v]:.3f} ({ms['F.linear'] / ms[v]:.2f}x)" for v in variants]
            print(f"| {name} | {k} x {n} | {m} | " + " | ".join(cells) + " |")
        del weights, packed


def bench_decode(variants: list[str], repeats: int, clock: Callable[[], float]) -> None:
    print("\n## paged decode: gather + SDPA vs the kernel, ms per call (ratio = SDPA / kernel)\n")
    print("| batch | contexts | gather + SDPA | " + " | ".join(variants) + " |")
    print("| ---: | --- | ---: | " + " | ".join("---:" for _ in variants) + " |")
    heads, kv_heads, dim, block = 9, 3, 64, 16
    scale = dim**-0.5
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 32):
        lens = torch.randint(90, 111, (batch,), generator=gen)  # [B] ~100 tokens each
        per_seq = -(-int(lens.max()) // block)
        blocks = 4 * batch * per_seq  # a cache larger than what the batch uses, shuffled
        k_blocks = torch.randn(blocks, block, kv_heads, dim, generator=gen)  # [N, bs, Hkv, D]
        v_blocks = torch.randn(blocks, block, kv_heads, dim, generator=gen)
        tables = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
        q = torch.randn(batch, heads, dim, generator=gen)  # [B, H, D]
        positions = torch.arange(per_seq * block)
        mask = (positions[None, :] < lens[:, None])[:, None, None, : int(lens.max())]
        paged = SimpleNamespace(  # what _decode_attention reads of a PagedBatch
            decode_kernel="sdpa",
            decode_rows=torch.arange(batch),
            decode_tables=tables,
            decode_mask=mask,  # [B, 1, 1, L]
            decode_lens=lens,
        )
        args = (q, k_blocks, v_blocks)
        candidates: dict[str, Callable[[], object]] = {
            "sdpa": lambda p=paged, a=(*args, scale): _decode_attention(p, *a),
        }
        for variant in variants:
            candidates[variant] = lambda a=(*args, tables, lens, scale), v=variant: (
                cpu_kernels.paged_decode(*a, v)
            )
        ms = median_ms(candidates, repeats, clock)
        want = candidates["sdpa"]()
        for variant in variants:
            error = (candidates[variant]() - want).abs().max().item()
            assert error < 1e-4, f"{variant} differs from SDPA by {error}"
        cells = [f"{ms[v]:.3f} ({ms['sdpa'] / ms[v]:.2f}x)" for v in variants]
        span = f"{int(lens.min())}-{int(lens.max())}"
        print(f"| {batch} | {span} | {ms['sdpa']:.3f} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", help="comma-separated (default: all of variants())")
    parser.add_argument("--skip", default="", help="comma-separated: linear, decode")
    parser.add_argument("--threads", type=int, help="torch's (and the kernels') threads")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: the process's CPU time, robust on a busy machine (only with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu sums the CPU time of all threads: use it with --threads 1")
    variants = args.variants.split(",") if args.variants else cpu_kernels.variants()
    for variant in variants:
        if (problem := cpu_kernels.problem(variant)) is not None:
            sys.exit(f"{variant}: {problem}")
    print(describe())
    print(
        f"threads: {torch.get_num_threads()}; clock: {args.clock}; repeats: {args.repeats}; "
        f"variants: {', '.join(variants)}; load average: {os.getloadavg()[0]:.2f}"
    )
    torch.set_grad_enabled(False)
    clock = CLOCKS[args.clock]
    if "linear" not in args.skip:
        bench_linear(variants, args.repeats, clock)
    if "decode" not in args.skip:
        bench_decode(variants, args.repeats, clock)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

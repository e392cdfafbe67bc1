"""Where a step's time goes on CUDA: hearth's forward vs the stock model, and the top kernels.

    python bench/step_profile.py                 # Llama-3.1-8B shape, random bf16, one GPU
Times (a) a prefill step of 8 fresh 1024-token prompts through hearth's runner and the same
tokens through the stock transformers forward ([8, 1024], SDPA); (b) a decode step of 256
sequences at ~1024 tokens of context, eager and as a CUDA graph; (c) one batch-1 decode (graph);
then prints torch.profiler's top CUDA kernels of the prefill step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.engine_bench import load, sync
from bench.machine import describe
from hearth.engine.config import EngineSettings
from hearth.engine.runner import ModelRunner, StepInputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run with --shape tiny


def timed(fn, repeats: int = 5) -> float:
    """Median milliseconds of fn() (synchronized)."""
    fn()
    sync(DEVICE)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(DEVICE)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def prefill_step(prompts: int, length: int, block: int) -> StepInputs:
    step = StepInputs()
    per_seq = -(-length // block)
    for i in range(prompts):
        row = len(step.input_ids)
        step.input_ids += torch.randint(100, 30000, (length,)).tolist()
        step.positions += range(length)
        step.slot_mapping += [i * per_seq * block + p for p in range(length)]
        step.prefills.append((row, length, length, None))
        step.sample_rows.append(row + length - 1)
    return step


def decode_step(batch: int, context: int, block: int) -> StepInputs:
    step = StepInputs()
    per_seq = -(-(context + 1) // block)
    for i in range(batch):
        table = list(range(i * per_seq, (i + 1) * per_seq))
        step.input_ids.append(100 + i)
        step.positions.append(context)
        step.slot_mapping.append(table[context // block] * block + context % block)
        step.decode_rows.append(i)
        step.decode_tables.append(table)
        step.decode_lens.append(context + 1)
        step.sample_rows.append(i)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--decode-batch", type=int, default=256)
    args = parser.parse_args()
    print(describe(), flush=True)  # the machine every figure below was measured on
    ns = argparse.Namespace(
        source=None,
        shape=args.shape,
        device=DEVICE,
        prompt_len=1024,
        output_len=128,
        concurrency=256,
        kv_memory="40GiB",
        max_batched_tokens=8192,
    )
    loaded = load(ns)
    model = loaded.model
    ids = torch.randint(100, 30000, (8, 1024), device=DEVICE)
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        stock = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))
    limits = EngineSettings(
        max_num_seqs=256, decode_kernel="triton", cuda_graphs=True, max_num_batched_tokens=8192
    )
    blocks = 256 * 66 + 8
    runner = ModelRunner(model, blocks, loaded.dtype, limits, 1168)
    bs = limits.block_size
    prefill = prefill_step(8, 1024, bs)
    ours = timed(lambda: runner.forward(prefill))
    print(f"prefill 8 x 1024: stock forward {stock:.1f} ms, hearth runner {ours:.1f} ms")
    decode = decode_step(args.decode_batch, 1024, bs)
    graphs, runner.graphs = runner.graphs, None
    eager = timed(lambda: runner.forward(decode))
    runner.graphs = graphs
    graph = timed(lambda: runner.forward(decode))
    one = decode_step(1, 200, bs)
    one_graph = timed(lambda: runner.forward(one), 20)
    print(
        f"decode {args.decode_batch} x 1024: eager {eager:.1f} ms, graph {graph:.1f} ms; "
        f"batch 1 at 200: graph {one_graph:.2f} ms"
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        runner.forward(prefill)
        sync(DEVICE)
    key = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()

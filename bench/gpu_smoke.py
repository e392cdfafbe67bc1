"""CUDA smoke check: kernels against float64 references, then tiny engines against generate().

    python bench/gpu_smoke.py --tokenizer DIR --out /tmp/tiny-llama          # the device check's
    python bench/gpu_smoke.py --tokenizer DIR --out /tmp/tiny-llama --all    # every variant

Default (bench/gpu_check.sh's correctness stage, ~1 minute): the Triton paged decode kernel
against float64 attention (contexts spanning many 64-token tiles, fp32 and bf16) and its time
against gather + SDPA; one fp8 matmul (the Fp8Linear path the engine runs) against float64;
then two engines on a tiny random Llama: fp32 with autotune on (its measured kernels), greedy
tokens of 11 concurrent requests asserted equal to generate(); and bf16 with fp8 random weights
(load_format dummy), agreement with generate() of the same model reported.
--all: the older matrix (sdpa, triton, triton + graphs, the defaults; Llama and Qwen2; dummy
weights), fp32 asserted, bf16 reported. Builds the checkpoint, so `hearth serve --model OUT`
can serve the Llama.
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
from hearth.engine.kernels.fusion import restore_forwards
from hearth.engine.loading.loader import load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, SamplingParams


def build(out: Path, tokenizer_dir: Path, family: str = "llama") -> None:
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    shape = dict(
        vocab_size=49152,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,  # head size 128, as in Llama 3
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    if family == "qwen2":  # q/k/v biases, the Qwen2 norm and MLP classes
        Qwen2ForCausalLM(Qwen2Config(**shape)).save_pretrained(out)
    else:
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(out)
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


KERNEL_CASES = ((torch.float32, 37, 300), (torch.bfloat16, 256, 1100))  # dtype, batch, longest


def check_kernel(device: str, cases=KERNEL_CASES, timing: bool = True) -> None:
    """paged_decode on random data against float64 attention; then, at the last case's shape
    (a Llama-3-8B layer, 256 sequences of up to 1100 tokens), its time against gather + SDPA."""
    from hearth.engine.kernels.attention import PagedBatch, _decode_attention
    from hearth.engine.kernels.triton_attention import paged_decode

    gen = torch.Generator(device=device).manual_seed(0)
    heads, kv_heads, dim, bs = 32, 8, 128, 16
    for dtype, batch, longest in cases:
        lens = torch.randint(1, longest + 1, (batch,), device=device, generator=gen)
        per_seq = -(-longest // bs)
        blocks = batch * per_seq + 3
        tables = torch.randperm(blocks, device=device, generator=gen)[: batch * per_seq]
        tables = tables.view(batch, per_seq)
        k = torch.randn(blocks, bs, kv_heads, dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(blocks, bs, kv_heads, dim, device=device, dtype=dtype, generator=gen)
        q = torch.randn(batch, heads, dim, device=device, dtype=dtype, generator=gen)
        out = paged_decode(q, k, v, tables, lens, dim**-0.5)
        worst = 0.0
        for b in range(batch):
            length = int(lens[b])
            slots = (tables[b, torch.arange(length, device=device) // bs] * bs) + (
                torch.arange(length, device=device) % bs
            )
            kk = k.flatten(0, 1)[slots].double().repeat_interleave(heads // kv_heads, 1)
            vv = v.flatten(0, 1)[slots].double().repeat_interleave(heads // kv_heads, 1)
            weights = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), kk) / dim**0.5, -1)
            ref = torch.einsum("hl,lhd->hd", weights, vv)
            err = ((out[b].double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err if err == err else float("inf"))
        print(f"kernel {dtype} batch {batch}: worst relative error {worst:.2e}", flush=True)
        assert worst < (1e-5 if dtype == torch.float32 else 1e-2), worst
    if not timing:
        return
    import triton.testing

    # Time at the bf16 shape: the kernel vs gather + SDPA (the engine's default path).
    mask = torch.arange(longest, device=device)[None, :] < lens[:, None]
    paged = PagedBatch([k], [v], lens, torch.arange(batch, device=device), tables, None, [])
    paged.decode_mask, paged.decode_lens = mask[:, None, None, :], lens
    kernel_ms = triton.testing.do_bench(
        lambda: paged_decode(q, k, v, tables, lens, dim**-0.5), return_mode="median"
    )
    sdpa_ms = triton.testing.do_bench(
        lambda: _decode_attention(paged, q, k, v, dim**-0.5), return_mode="median"
    )
    read = 2 * int(lens.sum()) * kv_heads * dim * k.element_size()
    print(
        f"decode attention, 256 x ~{int(lens.float().mean())} tokens, one layer: triton "
        f"{kernel_ms * 1e3:.0f} us ({read / kernel_ms / 1e6:.0f} GB/s of KV), gather + SDPA "
        f"{sdpa_ms * 1e3:.0f} us",
        flush=True,
    )


VARIANTS = {
    "sdpa": {"decode_kernel": "sdpa"},
    "triton": {"decode_kernel": "triton", "cuda_graphs": False, "fused_kernels": False},
    "triton+graphs": {"decode_kernel": "triton", "cuda_graphs": True, "fused_kernels": False},
    "defaults (triton+graphs+fused)": {},
}


def check_fp8_matmul(device: str) -> None:
    """Fp8Linear (the engine's fp8 path: e4m3 weights per channel, activations per token on the
    fp8 units where the device has them) against float64 of the same dequantized weight, at the
    8B MLP's up shape; the error is the activations' e4m3 rounding (~2^-4 per element)."""
    from hearth.engine.quantization.fp8 import Fp8Linear, fast_path

    gen = torch.Generator(device="cpu").manual_seed(0)
    linear = torch.nn.Linear(4096, 14336, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02, generator=gen)
    layer = Fp8Linear.from_linear(linear).to(device)
    weight = layer.dequantized(torch.float64)  # [N, K]
    for rows in (1, 37, 512):
        x = torch.randn(rows, 4096, generator=gen).to(device, torch.bfloat16)  # [M, K]
        got = layer(x).double()  # [M, N]
        want = x.double() @ weight.T
        err = ((got - want).norm() / want.norm()).item()
        print(f"fp8 matmul M={rows}: relative error {err:.2e} vs float64", flush=True)
        assert err < 0.06, err
    print(f"fp8 matmul path: {'fp8 units (_scaled_mm)' if fast_path(device) else 'weight-only'}")


def prompts_for_engines() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    # 11 requests: CUDA graphs replay bucket 16 with 5 padding rows.
    return [torch.randint(3, 49152, (8 + 37 * i,), generator=gen).tolist() for i in range(11)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tiny-llama"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--all", action="store_true", help="the whole matrix of variants")
    args = parser.parse_args()
    print(describe(), flush=True)  # the machine every figure below was measured on
    check_kernel(args.device)
    check_fp8_matmul(args.device)
    build(args.out, args.tokenizer)
    prompts = prompts_for_engines()
    if not args.all:
        compare(args.out, args.device, prompts, {"autotune on (fp32)": {}}, dtypes=("float32",))
        fp8 = {"fp8 random weights (bf16)": {}}
        compare(args.out, args.device, prompts, fp8, "dummy", ("bfloat16",), quantization="fp8")
        return
    compare(args.out, args.device, prompts, VARIANTS)
    qwen2 = args.out.with_name(args.out.name + "-qwen2")
    build(qwen2, args.tokenizer, "qwen2")
    compare(qwen2, args.device, prompts, {"sdpa": VARIANTS["sdpa"], "defaults (qwen2)": {}})
    # load_format dummy: the same config, random weights built on the GPU (seeded: every load
    # builds the same model, so the first one's generate() is every variant's reference).
    dummy = {"sdpa": VARIANTS["sdpa"], "defaults (load_format dummy)": {}}
    compare(args.out, args.device, prompts, dummy, load_format="dummy")


def compare(
    path: Path,
    device: str,
    prompts: list[list[int]],
    variants: dict,
    load_format: str = "auto",
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    quantization: str = "none",
) -> None:
    """Each variant's greedy tokens against generate() of the stock model (its own modules:
    SDPA, no fused kernels; fp8 layers stay fp8), asserted equal in fp32, reported otherwise."""
    for dtype in dtypes:
        reference = None
        for variant, limits in variants.items():
            config = ModelConfig(
                id="tiny",
                source=str(path),
                device=device,
                dtype=dtype,
                load_format=load_format,
                quantization=quantization,
                engine={
                    "kv_cache_memory": "256MiB",
                    "max_num_batched_tokens": 128,
                    "max_num_seqs": 16,
                    **limits,
                },
            )
            loaded = load_model(config, resolve_source(config.source))
            engine = build_engine(loaded)
            try:
                got = asyncio.run(run(engine, prompts, 24))
            finally:
                engine.shutdown()
            if reference is None:  # the stock model: SDPA and the modules' own forwards
                model = loaded.model
                model.set_attn_implementation("sdpa")
                restore_forwards(model)
                reference = [
                    model.generate(
                        torch.tensor([prompt], device=device),
                        max_new_tokens=24,
                        min_new_tokens=24,
                        do_sample=False,
                        pad_token_id=0,
                    )[0, len(prompt) :].tolist()
                    for prompt in prompts
                ]
            same = sum(want == tokens for want, tokens in zip(reference, got, strict=True))
            stats = engine.stats()
            print(
                f"{dtype} {variant}: {same}/{len(prompts)} requests identical to generate(); "
                f"KV blocks used after: {stats.kv_blocks_used}; prefilled "
                f"{stats.num_prefilled_tokens}",
                flush=True,
            )
            assert stats.kv_blocks_used == 0, "KV blocks left in use"
            if dtype == "float32":  # bf16 rounding may flip a near tie: reported, not asserted
                assert same == len(prompts), f"{variant}: greedy tokens differ from generate()"
            del engine, loaded
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

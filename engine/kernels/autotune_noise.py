"""Autotune that noise cannot fool: when a measured kernel decision is to be trusted.

A decision made on a busy host can cache the wrong winner for every later start (a start while
other work ran picked `decode attention sdpa` at 28 ms per batch-1 step; a quiet start picked
`cpu` at 21 ms). So a decision is marked *provisional*, and re-measured at a later quiet start,
when the host was busy as it was measured (load average per core above LOAD_LIMIT), when the
winner's own repeats spread too much (SPREAD_LIMIT), or when the interleaved passes disagree on
the winner. And a served model whose batch-1 decode steps run much slower than the cached
figure (`SlowWatch`) is re-measured at the engine's next idle moment (engine/runner.py
`retune`). Times and loads are injected in the tests (tests/unit/test_autotune_noise.py).
"""

from __future__ import annotations

import os
import statistics
from collections import deque

LOAD_LIMIT = 0.5  # 1-minute load average per usable core before measuring: above it, busy
SPREAD_LIMIT = 0.25  # (median - min) / min of one candidate's repeats: above it, noisy
SLOW_FACTOR = 1.5  # served batch-1 steps this much slower than the cached figure: re-measure
SLOW_STEPS = 32  # over the median of this many batch-1 decode steps


def host_load() -> float:
    """The 1-minute load average per usable core (0 where the OS does not say)."""
    try:
        return os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        return 0.0


def spread(samples: list[float]) -> float:
    """(median - min) / min of one candidate's timed repeats; 0 for fewer than two."""
    if len(samples) < 2:
        return 0.0
    low = min(samples)
    return (statistics.median(samples) - low) / max(low, 1e-12)


def provisional_reason(
    load: float, winner_samples: dict[str, list[float]], pass_winners: list[object]
) -> str | None:
    """Why a decision cannot be trusted, or None: `load` the host's load per core before
    measuring, `winner_samples` (workload name -> the winner's timed repeats, every pass),
    `pass_winners` the winner of each interleaved pass on its own."""
    if load > LOAD_LIMIT:
        return f"host busy (load {load:.2f} per core > {LOAD_LIMIT})"
    noisy = {n: spread(s) for n, s in winner_samples.items() if spread(s) > SPREAD_LIMIT}
    if noisy:
        worst = max(noisy, key=noisy.get)
        return f"repeats spread {noisy[worst]:.0%} on {worst} (> {SPREAD_LIMIT:.0%})"
    if len(set(pass_winners)) > 1:
        return "the passes chose different winners"
    return None


def remeasure_cached(provisional: str | None, load: float) -> bool:
    """Whether a cached decision is measured again at this start: it was provisional and the
    host is quiet now (a busy host keeps the provisional decision until a quiet start)."""
    return provisional is not None and load <= LOAD_LIMIT


class SlowWatch:
    """Watches a served model's batch-1 decode step times against the decision's figure:
    `observe` returns True once the median of the last `steps` is above `factor` times
    `expected` (seconds); then it stays quiet until `reset`."""

    def __init__(
        self, expected: float | None, factor: float = SLOW_FACTOR, steps: int = SLOW_STEPS
    ) -> None:
        self.expected, self.factor = expected, factor
        self.recent: deque[float] = deque(maxlen=steps)
        self.fired = False

    def observe(self, seconds: float) -> bool:
        if self.expected is None or self.fired:
            return False
        self.recent.append(seconds)
        if len(self.recent) < (self.recent.maxlen or 1):
            return False
        if statistics.median(self.recent) > self.factor * self.expected:
            self.fired = True
        return self.fired

    def reset(self, expected: float | None) -> None:
        self.expected, self.fired = expected, False
        self.recent.clear()

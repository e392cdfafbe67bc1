"""An engine thread's OpenMP team size, following the cores that are actually free.

A team of n threads waits at every barrier of every op for its slowest worker: when another
program keeps one of two cores busy, a 2-thread team loses its second worker for a scheduler
time slice at a time, and a decode step that takes 16 ms on a quiet machine takes a second or
more (a single thread has no barrier and runs at its own speed). So the engine thread times
its steps and changes its team size with `torch.set_num_threads` (which sets the *calling*
thread's OpenMP team size, and MKL's):

- Each step's time is compared with a reference for the same shape (tokens in the step,
  rounded up to a power of two): a running low quantile of its steps, seeded with what
  autotune measured per thread count (`ModelRunner.thread_times`): a `norm` of 1.0 is as fast
  as this shape runs at its best.
- **Fewer threads** are *tried* when the last steps ran far slower than that (`SLOW` times,
  one step suffices past `VERY_SLOW`), or when other processes leave fewer cores free than the
  team has (engine/cores.py): the next `window` steps run one thread fewer; the smaller team
  is kept when it is not slower, else the old one comes back.
- **More threads** are tried when the free cores allow (or, where free cores cannot be told,
  from time to time), and kept only when clearly faster (`GAIN`); a trial's first step that is
  far slower than before ends it at once.
- A failed trial doubles that direction's wait (`backoff` steps, up to `MAX_BACKOFF`) before
  the next try: under a steady load the team settles and does not oscillate. Changes are at
  least `window` steps apart (but for an ended trial's return).
- Several engines in one process share the cores (`CoreBudget.share`): a team never exceeds
  its share, and shrinks to it at once when another engine starts stepping.

Set HEARTH_THREAD_CONTROL=off to keep the team autotune chose (the behaviour before this).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from statistics import median

from hearth.engine.cores import CoreBudget

log = logging.getLogger("hearth.engine")

SLOW = 2.0  # steps this many times slower than the shape's best: try fewer threads
VERY_SLOW = 4.0  # one step this slow suffices
GAIN = 0.9  # a larger team is kept when its steps take at most this fraction of the old ones
KEEP = 1.05  # a smaller team is kept when its steps take at most this multiple of the old ones
ABORT = {1: 1.5, -1: 2.0}  # a trial's first step this many times slower than before ends it
QUANTILE, RATE = 0.1, 0.05  # a shape's reference time: the steps' running 10th percentile
ENOUGH_SECONDS = 1.0  # steps of a trial (or since a change) that suffice when this slow
BACKOFF = 32  # steps before retrying a direction after a failed trial (doubles each time)
MAX_BACKOFF = 2048


def _omp_max_threads() -> Callable[[], int] | None:
    """The calling thread's OpenMP team size (omp_get_max_threads of the OpenMP runtime torch
    loaded), or None where no such symbol is visible."""
    try:
        fn = ctypes.CDLL(None).omp_get_max_threads
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_int
    return fn


_OMP: list[Callable[[], int] | None] = []  # looked up at first use (after torch has loaded)


def team_size() -> int:
    """Threads the calling thread's parallel regions run: its own OpenMP team size. torch's
    get_num_threads() answers the count any thread set last (measured, torch 2.13), while each
    thread's `#pragma omp parallel` (ATen's parallel_for too) uses its own: with several
    engine threads, hearth's C++ kernels must ask this."""
    import torch

    if not _OMP:
        _OMP.append(_omp_max_threads())
    return max(1, _OMP[0]()) if _OMP[0] is not None else torch.get_num_threads()


def enabled() -> bool:
    """False when HEARTH_THREAD_CONTROL is off/0/false (the thread count then stays fixed)."""
    return os.environ.get("HEARTH_THREAD_CONTROL", "on").lower() not in ("off", "0", "false")


def shape(tokens: int) -> int:
    """A step's shape key: its token count rounded up to a power of two."""
    return 1 << max(0, tokens - 1).bit_length()


def _low_quantile(estimate: float | None, seconds: float) -> float:
    """The running QUANTILE of a shape's step times, moved RATE (relative) per step (a
    stochastic quantile estimate): the fastest step alone would drift to the noise's floor and
    make every ordinary step look slow."""
    if estimate is None:
        return seconds
    if seconds < estimate:
        return max(seconds, estimate * (1 - RATE * (1 - QUANTILE)))
    return estimate * (1 + RATE * QUANTILE)


class ThreadController:
    """One engine thread's team size: call `before_step()` then `after_step(seconds, tokens)`
    around each step, on the engine thread. `apply(n)` sets the team size (torch's
    set_num_threads in the engine; injected in tests); `budget` gives the share and the free
    cores (None: this engine alone, free cores unknown)."""

    def __init__(
        self,
        name: str,
        max_threads: int,
        start: int,
        apply: Callable[[int], None],
        budget: CoreBudget | None = None,
        figures: dict[int, dict[int, float]] | None = None,  # autotune.thread_times
        window: int = 8,
    ) -> None:
        self.name, self.max_threads, self.apply = name, max(1, max_threads), apply
        self.threads = min(max(1, start), self.max_threads)
        self.budget, self.window = budget, window
        self.best: dict[int, float] = {}  # shape -> fastest step seen (seconds)
        for times in (figures or {}).values():
            for tokens, seconds in times.items():
                key = shape(tokens)
                self.best[key] = min(self.best.get(key, seconds), seconds)
        self.recent: list[float] = []  # norms at self.threads since the last change
        self.trial: tuple[int, float, list[float]] | None = None  # (old threads, old norm, norms)
        self.since_change = 0
        self.since_seconds = 0.0  # step time since the last change
        self.wait = {-1: 0, 1: 0}  # direction -> steps until it may be tried again
        self.backoff = {-1: BACKOFF, 1: BACKOFF}
        self.changes = 0

    # -- around each step -------------------------------------------------------------------
    def before_step(self) -> int:
        """The team size for the next step (applied): never above the engine's share."""
        if self.budget is not None:
            self.budget.stepping(self.name)
            cap = min(self.max_threads, self.budget.share())
            if self.threads > cap:
                self.trial = None
                self._change(cap, "its share of the cores is smaller")
        return self.threads

    def after_step(self, seconds: float, tokens: int) -> None:
        """Record a step of `tokens` tokens that took `seconds`; maybe change the team."""
        key = shape(tokens)
        best = self.best.get(key)
        norm = seconds / best if best else 1.0
        if self.trial is None:  # a trial's steps are all judged by one yardstick
            self.best[key] = _low_quantile(best, seconds)
        self.since_change += 1
        self.since_seconds += seconds
        for direction in self.wait:
            self.wait[direction] = max(0, self.wait[direction] - 1)
        if self.trial is not None:
            self._judge(norm)
            return
        self.recent.append(norm)
        del self.recent[: -self.window]
        if not self._enough(self.since_change, self.since_seconds) and norm < VERY_SLOW:
            return
        level = median(self.recent[-self.window :])
        free = self.budget.free_cores() if self.budget is not None else None
        cap = min(self.max_threads, self.budget.share()) if self.budget else self.max_threads
        if self.threads > 1 and not self.wait[-1]:
            crowded = free is not None and free < self.threads - 0.5
            if norm >= VERY_SLOW or level >= SLOW or crowded:
                latest = median(self.recent[-3:])  # a load that just came shows there first
                level = max(level, norm if norm >= VERY_SLOW else latest)
                why = f"steps {level:.1f}x the best" if not crowded else f"{free:.1f} cores free"
                return self._start(-1, level, why)
        grow = self.threads < cap and not self.wait[1] and self.since_change >= self.window
        if grow and (free is None or free >= self.threads + 0.6):
            room = "from time to time" if free is None else f"{free:.1f} cores free"
            return self._start(1, level, room)

    def _enough(self, steps: int, seconds: float) -> bool:
        """Steps enough to judge by: a window of them, or a few that took ENOUGH_SECONDS (a
        team stalled at its barriers takes seconds a step: a window would take minutes)."""
        return steps >= self.window or (steps >= 3 and seconds >= ENOUGH_SECONDS)

    # -- trials -----------------------------------------------------------------------------
    def _start(self, direction: int, level: float, why: str) -> None:
        self.trial = (self.threads, level, [])
        self._change(self.threads + direction, f"trying: {why}")

    def _judge(self, norm: float) -> None:
        old, before, norms = self.trial
        norms.append(norm)
        direction = 1 if self.threads > old else -1
        if len(norms) == 1 and norm > ABORT[direction] * before:
            return self._fail(direction, old, norm, before)
        if not self._enough(len(norms), self.since_seconds):
            return
        level = median(norms)
        kept = level <= before * (GAIN if direction > 0 else KEEP)
        if not kept:
            return self._fail(direction, old, level, before)
        self.trial = None
        self.backoff[direction] = BACKOFF
        self.wait[-direction] = self.backoff[-direction]  # the way back was worse just now
        self.recent = norms[-self.window :]
        log.debug(
            "%s: keeping %d threads (steps %.2fx the best, %.2fx with %d)",
            self.name,
            self.threads,
            level,
            before,
            old,
        )

    def _fail(self, direction: int, old: int, level: float, before: float) -> None:
        self.trial = None
        self.wait[direction] = self.backoff[direction]
        self.backoff[direction] = min(MAX_BACKOFF, 2 * self.backoff[direction])
        self._change(old, f"{level:.2f}x the best against {before:.2f}x: back")

    def _change(self, threads: int, why: str) -> None:
        log.debug("%s: %d -> %d threads (%s)", self.name, self.threads, threads, why)
        self.threads = threads
        self.apply(threads)
        self.changes += 1
        self.since_change, self.since_seconds = 0, 0.0
        self.recent = []

"""The process's share of the CPU: cores other processes leave free, split among busy engines.

Every CPU engine thread (generation models, the embedding engine) brings its own OpenMP team,
and a team stalls at each barrier of each op whenever one of its workers is descheduled. So
the teams of one process must not add up to more threads than there are free cores
(engine/threads.py keeps each engine's team within its share):

- `CpuMonitor` tells how many cores *other processes* keep busy on the CPUs this process may
  run on: the busy time of those CPUs in /proc/stat (Linux) less this process's own CPU time,
  over the wall time between two readings, smoothed. None where /proc/stat cannot be read
  (other systems), or the CPUs are limited by a cgroup quota rather than a CPU set (then the
  step times alone steer, see engine/threads.py).
- `CoreBudget` (one per process, `budget()`) counts the engines that stepped recently and
  gives each `share()` = max(1, cores // busy engines): three busy engines on two cores run
  one thread each, which oversubscribes by one thread but has no barrier to stall on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

ACTIVE_SECONDS = 1.0  # an engine that stepped this recently counts as busy
SAMPLE_SECONDS = 0.25  # readings of /proc/stat at least this far apart
SMOOTHING = 0.5  # weight of the newest reading in the moving average


def _read_proc_stat(cpus: set[int], path: Path = Path("/proc/stat")) -> float | None:
    """Seconds the CPUs `cpus` spent busy (all but idle and iowait) since boot, or None."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy, seen = 0, 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        fields = [int(f) for f in rest.split()]
        busy += sum(fields[:8]) - fields[3] - fields[4]  # user..steal less idle, iowait
        seen += 1
    return busy / tick if seen == len(cpus) else None


class CpuMonitor:
    """Cores kept busy by other processes on this process's CPUs, a moving average.

    `busy_seconds` (CPUs' busy seconds since boot) and `own_seconds` (this process's CPU
    seconds) are injectable for tests. Thread-safe: engines on several threads call `others`.
    """

    def __init__(
        self,
        busy_seconds: Callable[[], float | None] | None = None,
        own_seconds: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.cores = max(1, len(cpus) or (os.cpu_count() or 1))
        self._busy = busy_seconds or (lambda: _read_proc_stat(cpus) if cpus else None)
        self._own, self._clock = own_seconds, clock
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None  # (wall, busy, own)
        self._value: float | None = None

    def others(self) -> float | None:
        """Cores (0..cores) other processes used lately; None when it cannot be told."""
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last[0] < SAMPLE_SECONDS:
                return self._value
            busy = self._busy()
            if busy is None:
                return None
            own = self._own()
            if self._last is not None:
                wall, busy0, own0 = self._last
                used = ((busy - busy0) - (own - own0)) / max(now - wall, 1e-9)
                used = min(max(used, 0.0), float(self.cores))
                old = self._value
                self._value = used if old is None else SMOOTHING * used + (1 - SMOOTHING) * old
            self._last = (now, busy, own)
            return self._value


class CoreBudget:
    """The process's engines and their shares of the cores (see the module docstring)."""

    def __init__(self, monitor: CpuMonitor | None = None, clock=time.monotonic) -> None:
        self.monitor = monitor or CpuMonitor()
        self.cores = self.monitor.cores
        self._clock = clock
        self._lock = threading.Lock()
        self._stepped: dict[str, float] = {}  # engine name -> when it last stepped

    def stepping(self, name: str) -> None:
        """Engine `name` is about to step (it counts as busy for ACTIVE_SECONDS)."""
        with self._lock:
            self._stepped[name] = self._clock()

    def leave(self, name: str) -> None:
        with self._lock:
            self._stepped.pop(name, None)

    def busy_engines(self) -> int:
        now = self._clock()
        with self._lock:
            return max(1, sum(now - t <= ACTIVE_SECONDS for t in self._stepped.values()))

    def share(self) -> int:
        """Threads one busy engine may run: the cores split evenly among busy engines."""
        return max(1, self.cores // self.busy_engines())

    def free_cores(self) -> float | None:
        """Cores other processes leave free for this process's share (None: unknown)."""
        others = self.monitor.others()
        if others is None:
            return None
        return max(0.0, self.cores - others) / self.busy_engines()


_budget: CoreBudget | None = None
_budget_lock = threading.Lock()


def budget() -> CoreBudget:
    """The process's CoreBudget (made at first use)."""
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = CoreBudget()
        return _budget

"""engine/threads.py and engine/cores.py: the engine's team size under injected step times."""

from __future__ import annotations

import math
import random

from hearth.engine import threads as T
from hearth.engine.cores import CoreBudget, CpuMonitor

# Step seconds per (machine state, team size): a 2-thread team stalls at its barriers when one
# of the two cores is taken (as measured in issue 34: ~37x slower), one thread does not.
TIMES = {
    "quiet": {2: 0.016, 1: 0.020},
    "busy": {2: 0.60, 1: 0.021},
    "two busy": {2: 0.90, 1: 0.040},
    "mild": {2: 0.040, 1: 0.021},  # a load that slows two threads 2.5x: below VERY_SLOW
    "stalled": {2: 3.0, 1: 0.25},  # a crowded machine: seconds a step, no quiet figure known
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Machine:
    """Fake CPUs: `load` cores kept busy by other processes; the engine's steps advance time."""

    def __init__(self, cores: int = 2) -> None:
        self.clock, self.load, self.busy, self.own = Clock(), 0, 0.0, 0.0
        self.monitor = CpuMonitor(lambda: self.busy, lambda: self.own, self.clock)
        self.monitor.cores = cores

    def advance(self, seconds: float, own_threads: int) -> None:
        """The scheduler shares the cores evenly among runnable threads, a core each at most."""
        self.clock.now += seconds
        runnable = self.load + own_threads
        self.own += seconds * own_threads * min(1.0, self.monitor.cores / runnable)
        self.busy += seconds * min(self.monitor.cores, runnable)


def controller(
    budget: CoreBudget | None = None, start: int = 2, name: str = "test", **kw
) -> T.ThreadController:
    applied: list[int] = []
    figures = {2: {1: TIMES["quiet"][2]}, 1: {1: TIMES["quiet"][1]}}
    ctl = T.ThreadController(name, 2, start, applied.append, budget, figures, **kw)
    ctl.applied = applied  # type: ignore[attr-defined]
    return ctl


def run(ctl, state: str, steps: int, noise: float = 0.0, machine: Machine | None = None, rng=None):
    """Step `steps` times; returns the team size of each step."""
    rng = rng or random.Random(0)
    sizes = []
    for _ in range(steps):
        n = ctl.before_step()
        seconds = TIMES[state][n] * math.exp(rng.gauss(0, noise)) if noise else TIMES[state][n]
        if machine is not None:
            machine.advance(seconds, n)
        ctl.after_step(seconds, 1)
        sizes.append(n)
    return sizes


def test_shrinks_at_once_under_a_busy_core_and_stays():
    ctl = controller()
    run(ctl, "quiet", 20)
    assert ctl.threads == 2 and ctl.changes == 0
    sizes = run(ctl, "busy", 2000)
    assert sizes[:2].count(2) <= 1 and sizes[1] == 1  # one slow step, then one thread
    # without a free-core signal, larger teams are tried with a doubling wait: a handful of
    # one-step probes over 2000 steps, each ended at once
    assert sizes.count(2) <= 8
    assert ctl.changes <= 2 * 8 + 1
    assert ctl.threads == 1


def test_grows_back_when_quiet_again_and_settles():
    ctl = controller()
    run(ctl, "busy", 300)
    assert ctl.threads == 1
    sizes = run(ctl, "quiet", T.MAX_BACKOFF + 50)
    assert sizes[-1] == 2
    changes = ctl.changes
    run(ctl, "quiet", 1000)
    assert ctl.changes == changes and ctl.threads == 2


def test_noisy_quiet_machine_does_not_oscillate():
    ctl = controller()
    sizes = run(ctl, "quiet", 3000, noise=0.25, rng=random.Random(1))
    assert ctl.changes <= 12, ctl.changes
    assert sizes.count(2) >= 0.9 * len(sizes)


def test_noisy_busy_machine_settles_on_one_thread():
    ctl = controller()
    sizes = run(ctl, "busy", 3000, noise=0.25, rng=random.Random(2))
    assert sizes.count(1) >= 0.99 * len(sizes)
    assert ctl.changes <= 20


def test_free_core_signal_steers_without_probing_under_load():
    machine = Machine()
    budget = CoreBudget(machine.monitor, machine.clock)
    ctl = controller(budget)
    run(ctl, "quiet", 50, machine=machine)
    assert ctl.threads == 2
    machine.load = 1
    sizes = run(ctl, "busy", 3000, machine=machine)
    assert sizes[5:].count(2) == 0  # the busy core is seen: no probe of two threads
    machine.load = 0
    sizes = run(ctl, "quiet", 200, machine=machine)
    assert sizes[-1] == 2 and sizes.index(2) < 60  # back soon after the machine is quiet


def test_engines_of_one_process_share_the_cores():
    machine = Machine()
    budget = CoreBudget(machine.monitor, machine.clock)
    first, second = controller(budget, name="a"), controller(budget, name="b")
    run(first, "quiet", 20, machine=machine)
    assert first.threads == 2
    for _ in range(20):  # both step: one thread each
        run(first, "quiet", 1, machine=machine)
        run(second, "quiet", 1, machine=machine)
    assert first.threads == second.threads == 1
    budget.leave("b")  # the other engine is gone
    sizes = run(first, "quiet", 100, machine=machine)
    assert sizes[-1] == 2


def test_cpu_monitor_counts_other_processes_only():
    machine = Machine()
    machine.load = 1
    for _ in range(20):
        machine.advance(0.3, 1)
        others = machine.monitor.others()
    assert abs(others - 1.0) < 0.05
    machine.load = 0
    for _ in range(20):
        machine.advance(0.3, 2)
        others = machine.monitor.others()
    assert others < 0.05


def test_shape_rounds_tokens_up_to_powers_of_two():
    assert [T.shape(n) for n in (0, 1, 2, 3, 8, 9, 512)] == [1, 1, 2, 4, 8, 16, 512]


def test_switch_off(monkeypatch):
    monkeypatch.setenv("HEARTH_THREAD_CONTROL", "off")
    assert not T.enabled()
    monkeypatch.delenv("HEARTH_THREAD_CONTROL")
    assert T.enabled()


def test_a_milder_slowdown_is_judged_on_the_latest_steps():
    for budgeted in (False, True):
        machine = Machine()
        budget = CoreBudget(machine.monitor, machine.clock) if budgeted else None
        ctl = controller(budget)
        run(ctl, "quiet", 50, machine=machine)
        machine.load = 1
        sizes = run(ctl, "mild", 500, machine=machine)
        assert sizes[20:].count(2) <= 4, sizes[:40]


def test_team_size_is_the_calling_threads_own():
    """torch.get_num_threads() answers what any thread set last; the C++ kernels must run the
    calling engine thread's team (engine/kernels/cpu_kernels.py, gguf_kernels.py)."""
    import threading

    import torch

    seen: dict[str, int] = {}
    first_set, second_set = threading.Event(), threading.Event()

    def first() -> None:
        torch.set_num_threads(2)
        first_set.set()
        second_set.wait(10)
        seen["first"] = T.team_size()

    def second() -> None:
        first_set.wait(10)
        torch.set_num_threads(1)
        seen["second"] = T.team_size()
        second_set.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"first": 2, "second": 1}


def test_seconds_long_steps_without_a_quiet_figure_are_left_within_a_few_steps():
    machine = Machine()
    machine.load = 1
    budget = CoreBudget(machine.monitor, machine.clock)
    applied: list[int] = []
    ctl = T.ThreadController("cold", 2, 2, applied.append, budget, None)
    sizes = run(ctl, "stalled", 40, machine=machine)
    assert sizes.index(1) <= 4 and sizes[4:].count(2) == 0, sizes


def test_metrics_show_each_cpu_engines_team():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from hearth.engine.types import EngineStats
    from hearth.server.metrics import Metrics

    def engine(model: str, threads: int) -> SimpleNamespace:
        info = SimpleNamespace(model_id=model, task="generate")
        return SimpleNamespace(
            info=info, stats=lambda: EngineStats(0, 0, 0, 1, cpu_threads=threads)
        )

    metrics = Metrics(lambda: [engine("cpu-model", 1), engine("gpu-model", 0)])
    page = generate_latest(metrics.registry).decode()
    assert 'hearth_cpu_threads{model="cpu-model"} 1.0' in page
    assert 'hearth_cpu_threads{model="gpu-model"}' not in page

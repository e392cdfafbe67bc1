"""Autotune that noise cannot fool (engine/kernels/autotune_noise.py), with injected timings
and loads: busy or noisy decisions are provisional and re-measured at a quiet start; served
steps far slower than the decision's figure re-measure at the engine's next idle moment."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from hearth.engine.config import EngineSettings
from hearth.engine.kernels import autotune, autotune_noise
from hearth.engine.kernels.autotune import measure
from hearth.engine.kernels.autotune_noise import SlowWatch, provisional_reason, spread
from hearth.engine.runner import ModelRunner
from tests.engine.test_autotune import CPU_KERNELS, LOADS, SDPA, fake_runs
from tests.engine.test_cpu_kernels import tiny_llama

QUIET = {"decode x1": [1.0, 1.05, 1.1]}


def test_spread_is_median_over_min() -> None:
    assert spread([1.0]) == 0.0
    assert spread([1.0, 1.5, 2.0]) == pytest.approx(0.5)


def test_busy_noisy_or_disagreeing_decisions_are_provisional() -> None:
    assert provisional_reason(0.1, QUIET, [SDPA, SDPA]) is None
    assert "host busy" in provisional_reason(0.9, QUIET, [SDPA, SDPA])
    noisy = {"decode x1": [1.0, 1.6, 1.7], "p": [2.0, 2.0]}
    assert "spread 60% on decode x1" in provisional_reason(0.1, noisy, [SDPA])
    assert "different winners" in provisional_reason(0.1, QUIET, [SDPA, CPU_KERNELS])


def test_a_provisional_decision_is_remeasured_only_when_quiet() -> None:
    assert not autotune_noise.remeasure_cached(None, 0.0)
    assert not autotune_noise.remeasure_cached("host busy", 0.9)
    assert autotune_noise.remeasure_cached("host busy", 0.1)


def test_measure_keeps_every_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    apply, run, state = fake_runs({SDPA: 2.0, CPU_KERNELS: 1.0})
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: state["now"])
    results = measure(run, apply, [SDPA, CPU_KERNELS], LOADS, torch.float32, lambda: None, {})
    assert results[1].samples["decode x1"] == [1.0, 1.0, 1.0]
    assert results[1].samples["p"] == [1.0]  # prefill: two repeats fewer


def test_slow_watch_fires_once_on_the_median() -> None:
    watch = SlowWatch(0.010, factor=1.5, steps=4)
    for t in (0.030, 0.030, 0.030):
        assert not watch.observe(t)  # not enough steps yet
    assert watch.observe(0.030)
    assert not watch.observe(0.030)  # fired once; reset re-arms it
    watch.reset(0.020)
    assert not any(watch.observe(t) for t in (0.025, 0.025, 0.10, 0.025))  # median 0.025
    assert not SlowWatch(None).observe(1.0)  # no figure to compare with


def decision(tmp_path: Path) -> dict:
    [path] = list((tmp_path / "autotune").glob("*.json"))
    return json.loads(path.read_text())


def test_busy_start_is_cached_provisional_and_remeasured_at_a_quiet_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    limits = EngineSettings(max_num_seqs=4, max_num_batched_tokens=64)
    load = {"now": 2.0}
    monkeypatch.setattr(autotune_noise, "host_load", lambda: load["now"])
    ModelRunner(tiny_llama(), 40, torch.float32, limits, 128)
    assert decision(tmp_path)["provisional"].startswith("host busy")
    measured = {"count": 0}
    real = autotune.measure

    def counting(*args, **kwargs):
        measured["count"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(autotune, "measure", counting)
    with caplog.at_level(logging.INFO, logger="hearth.engine"):
        ModelRunner(tiny_llama(), 40, torch.float32, limits, 128)  # still busy: kept
        assert measured["count"] == 0 and "provisional: host busy" in caplog.text
        load["now"] = 0.0
        monkeypatch.setattr(autotune_noise, "SPREAD_LIMIT", 1e9)  # quiet and steady now
        ModelRunner(tiny_llama(), 40, torch.float32, limits, 128)
    assert measured["count"] > 0 and "re-measuring a provisional decision" in caplog.text
    stored = decision(tmp_path)
    assert stored["load"] == 0.0
    assert stored["provisional"] in (None, "the passes chose different winners")


def test_a_candidate_failing_in_one_pass_stays_out() -> None:
    ok = autotune.Result(SDPA, {"decode x1": 1.0}, samples={"decode x1": [1.0]})
    failed = autotune.Result(SDPA, {}, "RuntimeError: launch failed")
    best = autotune._best((ok, failed))
    assert best.error == "RuntimeError: launch failed" and best.times == {}

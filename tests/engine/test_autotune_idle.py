"""A served model whose batch-1 steps run far slower than its autotune figure is re-measured at
the engine's next idle moment (engine/kernels/autotune_noise.py SlowWatch), then serves on."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.engine.test_engine import hf_greedy, prompts, run_concurrently, start_engine


def test_slow_steps_remeasure_at_the_next_idle_moment(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    engine = start_engine(tiny_llama_dir)
    try:
        runner = engine.core.runner
        assert runner.slow.expected is not None  # the decision's batch-1 figure
        runner.slow.expected = 1e-9  # every served step is now "far slower than measured"
        runner.slow.recent = type(runner.slow.recent)(maxlen=4)
        prompt = prompts(1)[0]
        with caplog.at_level(logging.INFO, logger="hearth.engine"):
            run_concurrently(engine, [prompt], temperature=0, max_tokens=8)
            deadline = time.monotonic() + 120
            while "autotune: served steps run far slower" not in caplog.text:
                assert time.monotonic() < deadline, "no re-measure at the idle moment"
                time.sleep(0.2)
            while runner.slow.fired or runner.slow.expected == 1e-9:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert "measured in" in caplog.text.split("far slower")[-1]
        assert engine.core.blocks.cached == {}  # the timing steps overwrote the cache
        result = run_concurrently(engine, [prompt], temperature=0, max_tokens=8)
        assert result[0]["tokens"][0] == hf_greedy(engine, prompt, 8)
    finally:
        engine.shutdown()


def test_a_request_arriving_ends_the_remeasure_and_the_kernels_stay(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-measure asks between timed steps whether to stop (a request arrived, the engine
    is stopping): it ends at once, the kernels it found are applied again and the request is
    answered as before (not behind a whole measurement)."""
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    engine = start_engine(tiny_llama_dir)
    try:
        runner = engine.core.runner
        kernels = runner.kernels
        asked = []

        def stop() -> bool:
            asked.append(True)
            return len(asked) > 3  # a few timed steps, then "work arrived"

        # the engine thread waits on _wake: held, the re-measure runs here alone
        with caplog.at_level(logging.INFO, logger="hearth.engine"), engine._wake:
            runner.retune(stop)
        assert "re-measuring interrupted" in caplog.text
        assert "measured in" not in caplog.text
        assert runner.kernels == kernels and runner.should_stop is None
        assert all(t.abs().max() == 0 for t in runner.kv_cache.k_cache)  # zeros again
        prompt = prompts(1)[0]
        result = run_concurrently(engine, [prompt], temperature=0, max_tokens=8)
        assert result[0]["tokens"][0] == hf_greedy(engine, prompt, 8)
    finally:
        engine.shutdown()

"""Measured kernel choices: the pick, the correctness gate, the cache key, a real measurement."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from hearth.engine.config import EngineSettings
from hearth.engine.kernels import autotune, autotune_cache
from hearth.engine.kernels.autotune import Result, Workload, measure, pick, workloads
from hearth.engine.kernels.selection import Kernels, candidates
from hearth.engine.runner import ModelRunner
from tests.engine.test_cpu_kernels import tiny_llama

CPU = torch.device("cpu")
SDPA = Kernels("sdpa", False, False)
CPU_KERNELS = Kernels("cpu", False, False, True, "avx2")
LOADS = [Workload("decode x1", 1, 32), Workload("decode x8", 8, 32), Workload("p", 1, 64, True)]


def fake_runs(times: dict[Kernels, float], wrong: set[Kernels] = frozenset(), broken=()):
    """apply/run callables for `measure`: each candidate 'takes' its time (advanced on a fake
    clock), returns fixed logits (perturbed for the wrong ones), or raises (broken ones)."""
    state: dict[str, object] = {"now": 0.0}

    def apply(kernels: Kernels) -> Kernels:
        if kernels in broken:
            raise RuntimeError("launch failed")
        state["current"] = kernels
        return kernels

    def run(load: Workload) -> torch.Tensor:
        kernels = state["current"]
        state["now"] += times[kernels] * load.batch
        logits = torch.linspace(-3, 3, 16).repeat(load.batch, 1)
        return logits + 1.0 if kernels in wrong else logits

    return apply, run, state


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch):
    def install(state):
        monkeypatch.setattr(autotune.time, "perf_counter", lambda: state["now"])

    return install


def test_the_fastest_correct_candidate_wins(fake_clock) -> None:
    slow, fast = SDPA, CPU_KERNELS
    apply, run, state = fake_runs({slow: 3.0, fast: 1.0})
    fake_clock(state)
    results = measure(run, apply, [slow, fast], LOADS, torch.float32, lambda: None, {})
    assert results[1].times == {"decode x1": 1.0, "decode x8": 8.0, "p": 1.0}
    assert pick(results).kernels == fast


def test_wrong_or_failing_candidates_are_never_chosen(fake_clock) -> None:
    wrong, broken = Kernels("cpu", False, False), CPU_KERNELS
    fastest = {SDPA: 5.0, wrong: 0.1, broken: 0.01}
    apply, run, state = fake_runs(fastest, wrong={wrong}, broken={broken})
    fake_clock(state)
    results = measure(run, apply, [SDPA, wrong, broken], LOADS, torch.float32, lambda: None, {})
    assert "logits differ" in results[1].error and "launch failed" in results[2].error
    assert pick(results).kernels == SDPA
    with pytest.raises(ValueError, match="no kernel candidate ran correctly"):
        pick(results[1:])


def test_the_reference_path_must_run(fake_clock) -> None:
    apply, run, state = fake_runs({SDPA: 1.0}, broken={SDPA})
    fake_clock(state)
    with pytest.raises(RuntimeError, match="launch failed"):
        measure(run, apply, [SDPA], LOADS, torch.float32, lambda: None, {})


def test_pick_weighs_every_workload() -> None:
    """Fast at batch 1 but 3x slower at full batch loses to even on both."""
    a = Result(SDPA, {"x1": 1.0, "x64": 3.0})
    b = Result(CPU_KERNELS, {"x1": 1.2, "x64": 1.0})
    assert pick([a, b]).kernels == CPU_KERNELS


def test_half_precision_tolerates_rounding_not_garbage() -> None:
    want = torch.randn(4, 100)
    assert autotune.close_enough(want + 0.05 * torch.randn(4, 100), want, torch.bfloat16) is None
    assert autotune.close_enough(want + 0.01, want, torch.float32) is not None
    assert autotune.close_enough(torch.randn(4, 100), want, torch.bfloat16) is not None
    assert "non-finite" in autotune.close_enough(want * float("nan"), want, torch.bfloat16)


@pytest.mark.parametrize(
    ("seqs", "batched", "max_len", "blocks", "block_size"),
    [
        (64, 2048, 8192, 10000, 16),
        (64, 2048, 8192, 20, 16),
        (4, 16, 16, 3, 16),
        (256, 8192, 64, 9, 8),
    ],
)
def test_workloads_fit_the_cache(seqs, batched, max_len, blocks, block_size) -> None:
    loads = workloads(seqs, batched, max_len, blocks, block_size)
    decode = [w for w in loads if not w.prefill]
    [prefill] = [w for w in loads if w.prefill]
    used = max(w.batch * -(-w.context // block_size) for w in decode)
    assert used + -(-prefill.context // block_size) <= blocks
    assert decode[0].batch == 1 and max(w.batch for w in decode) <= seqs
    assert all(1 <= w.context <= max_len for w in loads) and prefill.context <= batched


def test_the_cache_key_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    limits = EngineSettings()
    key = autotune_cache.decision_key(model, CPU, torch.float32, limits, LOADS)
    assert key == autotune_cache.decision_key(model, CPU, torch.float32, limits, LOADS)
    hardware = autotune_cache._hardware(CPU)
    other_isa = "sse2" if hardware["isa"] != "sse2" else "avx2 fma"  # not this host's
    monkeypatch.setattr(autotune_cache, "_hardware", lambda _: {**hardware, "isa": other_isa})
    other_cpu = autotune_cache.decision_key(model, CPU, torch.float32, limits, LOADS)
    assert autotune_cache._path(other_cpu) != autotune_cache._path(key)
    monkeypatch.undo()
    for changed in (
        autotune_cache.decision_key(model, CPU, torch.bfloat16, limits, LOADS),
        autotune_cache.decision_key(
            model, CPU, torch.float32, EngineSettings(block_size=32), LOADS
        ),
        autotune_cache.decision_key(model, CPU, torch.float32, limits, LOADS[:2]),
    ):
        assert autotune_cache._path(changed) != autotune_cache._path(key)


def test_candidates_hold_explicit_settings() -> None:
    every = candidates(EngineSettings(), {CPU}, 64, torch.float32, ["avx512", "avx2"])
    assert every[0] == SDPA and len(set(every)) == len(every) == 7
    assert all(not k.graphs and not k.fused for k in every)
    fixed = candidates(EngineSettings(decode_kernel="cpu"), {CPU}, 64, torch.float32, ["avx2"])
    assert {k.decode for k in fixed} == {"cpu"} and {k.cpu_matmul for k in fixed} == {False, True}
    assert candidates(EngineSettings(), {CPU}, 64, torch.bfloat16, ["avx2"]) == [SDPA]


def test_candidates_on_one_gpu() -> None:
    """What the CUDA side times: SDPA and Triton decode, graphs (Triton only), fused or not."""
    pytest.importorskip("triton")
    gpu = {torch.device("cuda", 0)}
    every = candidates(EngineSettings(), gpu, 128, torch.bfloat16, [])
    assert every[0] == SDPA and len(set(every)) == len(every) == 6
    assert all(k.decode == "triton" for k in every if k.graphs)
    assert not any(k.cpu_matmul for k in every)
    pinned = candidates(EngineSettings(cuda_graphs=True), gpu, 128, torch.bfloat16, [])
    assert {(k.decode, k.graphs) for k in pinned} == {("triton", True)}
    assert candidates(EngineSettings(), gpu, 96, torch.bfloat16, [])[0] == SDPA  # untileable head
    assert all(
        k.decode == "sdpa" for k in candidates(EngineSettings(), gpu, 96, torch.bfloat16, [])
    )
    two = {torch.device("cuda", 0), torch.device("cuda", 1)}  # device_map: SDPA only
    assert candidates(EngineSettings(), two, 128, torch.bfloat16, []) == [SDPA]


def test_a_real_measurement_is_cached_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On this machine: every candidate timed on the tiny model, the winner is one of them, the
    decision lands in the cache, and a second start measures nothing."""
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    # a trusted decision (a provisional one is re-measured at a quiet start: test_autotune_noise)
    monkeypatch.setattr(autotune.autotune_noise, "provisional_reason", lambda *_: None)
    limits = EngineSettings(max_num_seqs=8, max_num_batched_tokens=64)
    with caplog.at_level(logging.INFO, logger="hearth.engine"):
        first = ModelRunner(tiny_llama(), 40, torch.float32, limits, 128).kernels
    [line] = [r.message for r in caplog.records if r.message.startswith("autotune:")]
    assert "measured in" in line and "decode x1" in line and "prefill 64" in line
    [cached] = list((tmp_path / "autotune").glob("*.json"))
    stored = json.loads(cached.read_text())
    assert Kernels(**stored["kernels"]) == first and first.threads >= 1
    assert len(stored["candidates"]) >= 2
    assert all(c["error"] is None for c in stored["candidates"])  # every path is correct here

    def no_measuring(*_, **__):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune, "measure", no_measuring)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hearth.engine"):
        assert ModelRunner(tiny_llama(), 40, torch.float32, limits, 128).kernels == first
    assert "cached decision" in caplog.text
    with pytest.raises(AssertionError, match="measured again"):
        ModelRunner(
            tiny_llama(),
            40,
            torch.float32,
            limits.model_copy(update={"autotune": "remeasure"}),
            128,
        )


def test_after_measuring_the_cache_is_zeroed_and_outputs_match_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    limits = EngineSettings(max_num_seqs=4, max_num_batched_tokens=32)
    runner = ModelRunner(tiny_llama(), 24, torch.float32, limits, 64)
    kv = runner.kv_cache
    assert all(not k.any() for k in kv.k_cache) and all(not v.any() for v in kv.v_cache)
    reference = ModelRunner(tiny_llama(), 24, torch.float32, EngineSettings(autotune="off"), 64)
    load = Workload("decode x4", 4, 20)
    for r in (runner, reference):
        r.kv_cache.fill(1, 8)
    got = runner.forward(runner.timing_step(load))
    want = reference.forward(reference.timing_step(load))
    assert autotune.close_enough(got, want, torch.float32) is None

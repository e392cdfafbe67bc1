"""The benchmarks run: the GPU benchmark's small CPU mode prints its table."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.fixtures.server import ROOT


def test_gpu_bench_small_mode_runs_on_cpu() -> None:
    result = subprocess.run(
        [sys.executable, "bench/gpu_bench.py", "--small"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    batch1 = re.search(
        r"^batch-1 decode tok/s \(16/16\) +([\d.]+) +bound ([\d.]+)", result.stdout, re.M
    )
    batched = re.search(r"^8 x 64/16 out tok/s +([\d.]+)", result.stdout, re.M)
    same = re.search(
        r"^4 x 64/16 out tok/s, hearth vs CB \(same prompts, same run\) +([\d.]+) +CB ([\d.]+)",
        result.stdout,
        re.M,
    )
    assert batch1 and batched and same, result.stdout
    assert all(float(v) > 0 for v in (*batch1.groups(), *batched.groups(), *same.groups()))


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", "bench/gpu_check.sh"], cwd=ROOT, check=True)


STUB_PYTHON = """#!/bin/bash
case "$1" in
  -c|bench/gpu_summary.py) exec {python} "$@";;
  -m) exit 0;;  # pip install of the wheels
  bench/gpu_smoke.py) echo "smoke fails"; exit 3;;
esac
echo "ran $*"
"""


def test_gpu_check_runs_every_section_and_prints_one_table(tmp_path) -> None:
    """With a stand-in for python3 (stage 0's imports run for real) and a faked H200: every
    section runs in order, a failing one does not stop the next, the table comes last."""
    import os

    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text(STUB_PYTHON.format(python=sys.executable))
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "out"
    (tmp_path / "gpu" / "tokenizer").mkdir(parents=True)
    (tmp_path / "gpu" / "shapes" / "llama-3.1-8b").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out)}
    env |= {"HEARTH_COMMIT": "abc1234", "GPU_CHECK_PART": "all", "GPU_CHECK_WHEELS": "none"}
    env |= {"GPU_CHECK_FAKE_GPU": "NVIDIA H200,143771,580", "GPU_CHECK_STAGE0_S": "90"}
    env["GPU_CHECK_ASSETS"] = str(tmp_path / "gpu")
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    order = ["setup", "stage 0", "correctness", "8B bf16", "8B fp8", "70B fp8", "70B bf16"]
    starts = [line.split("  ")[0] for line in summary.splitlines()[1:] if line[:1] != " "]
    assert starts == order, summary
    assert re.search(r"correctness +kernels vs float64.* FAILED rc=3", summary)
    assert re.search(r"70B bf16 +bench +ok", summary) and re.search(r"serve: one chat +ok", summary)
    assert "ran bench/gpu_bench.py --label 70B bf16" in (out / "check.log").read_text()


def test_gpu_summary_skips_a_torn_line(tmp_path) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text(
        '{"section": "70B bf16", "measure": "batch-1 decode tok/s", "value": 17.123, '
        '"baseline": "bound 30.1", "ratio": "57%"}\n{"section": "70B b'
    )
    out = subprocess.run(
        [sys.executable, "bench/gpu_summary.py", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"70B bf16 +batch-1 decode tok/s +17.1 +bound 30.1 +57%", out), out


def test_serve_check_answers_a_chat_on_a_dummy_model(tmp_path, smollm_tokenizer_dir) -> None:
    """`hearth serve --load-format dummy` on a config dir: ready, KV capacity logged, a chat
    request answered, exit 0 on SIGTERM (what the device check does with the 70B shape)."""
    import json

    from bench.shapes import write_checkpoint

    model = write_checkpoint("tiny", tmp_path / "tiny", smollm_tokenizer_dir)
    results = tmp_path / "results.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "bench/serve_check.py",
            "--label",
            "tiny",
            "--log",
            str(tmp_path / "serve.log"),
            "--json",
            str(results),
            "--",
            "--model",
            str(model),
            "--load-format",
            "dummy",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + (tmp_path / "serve.log").read_text()
    rows = {row["measure"]: row["value"] for row in map(json.loads, results.open())}
    assert rows["serve: chat completion tokens"] == 8 and rows["serve: exit code"] == 0
    assert rows["serve: KV capacity tokens (ready line)"] > 0


def test_gpu_bench_engines_keep_the_memory_share_and_autotune() -> None:
    """Every engine the bench builds gets --gpu-memory-utilization (a 70B bf16 needs 0.97)."""
    import argparse

    from bench.engine_bench import engine_settings
    from bench.gpu_bench import workload
    from hearth.engine.config import EngineSettings

    args = argparse.Namespace(
        shape="llama-3.3-70b",
        device="cuda",
        kv_memory=None,
        max_batched_tokens=4096,
        gpu_memory_utilization=0.97,
        autotune="off",
    )
    many = workload(args, requests=64, prompt_len=1024, output_len=128, concurrency=64)
    limits = EngineSettings(**engine_settings(many))
    assert limits.gpu_memory_utilization == 0.97 and limits.autotune == "off"
    assert limits.max_num_seqs == 64 and limits.max_num_batched_tokens == 4096

"""The benchmarks run: the GPU benchmark's small CPU mode prints its table."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


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
    batched = re.search(r"^8 x 64/16 out tok/s +([\d.]+) +CB ([\d.]+)", result.stdout, re.M)
    assert batch1 and batched, result.stdout
    assert all(float(v) > 0 for v in (*batch1.groups(), *batched.groups()))

"""A short soak in CI: 60 mixed requests, 20% dropped early; usage exact, nothing leaks."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

from tests.fixtures.server import ROOT, running_server


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_short_soak_with_disconnects(tiny_llama_dir: Path, tmp_path: Path) -> None:
    soak = load_soak()
    with running_server("--model", str(tiny_llama_dir), log_path=tmp_path / "log") as (url, proc):
        report = asyncio.run(
            soak.soak(url, tiny_llama_dir.name, 60, 16, 0.2, max_tokens=16, pid=proc.pid, warmup=16)
        )
    print(report.table())
    statuses = [o.status for o in report.outcomes]
    assert statuses.count("disconnected") >= 5 and statuses.count("ok") >= 30
    assert {(o.kind, o.stream) for o in report.outcomes if o.status == "ok"} == {
        (kind, stream) for kind in soak.KINDS for stream in (False, True)
    }
    assert report.failures(max_rss_growth=0.05) == []
    assert report.gauges_after == dict.fromkeys(report.gauges_after, 0.0)

"""The device check, proven on CPU: bench/gpu_check.sh with a faked card (its stage 0 runs for
real and fails fast on a broken install; the plan fits the card and the time budget), and the
pinned wheels of bench/gpu_prepare.sh (bench/gpu_wheels.txt, checked by bench/gpu_wheels.py)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from bench import gpu_wheels
from tests.fixtures.server import ROOT

H100 = "NVIDIA H100 80GB HBM3,81559,580.159.04"
H200 = "NVIDIA H200,143771,580.159.04"


def test_scripts_are_valid_bash() -> None:
    for script in ("bench/gpu_check.sh", "bench/gpu_prepare.sh"):
        result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_the_carried_folders_are_git_ignored() -> None:
    for folder in (".whl/", ".gpu/"):
        result = subprocess.run(
            ["git", "check-ignore", "-q", folder + "x"], cwd=ROOT, capture_output=True
        )
        assert result.returncode == 0, f"{folder} is not git-ignored"


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """A stand-in for .gpu/: the dry run reads neither the tokenizer nor the shapes."""
    (tmp_path / "assets" / "tokenizer").mkdir(parents=True)
    (tmp_path / "assets" / "shapes" / "llama-3.1-8b").mkdir(parents=True)
    return tmp_path / "assets"


def dry_run(out: Path, assets: Path, card: str, **env: str) -> tuple[int, str, list[dict], float]:
    """bench/gpu_check.sh on this machine with `card` faked, running no stage: (exit code,
    output, the JSON rows of results.jsonl, seconds)."""
    variables = {
        **os.environ,
        "OUT": str(out),
        "GPU_CHECK_FAKE_GPU": card,
        "GPU_CHECK_DRY_RUN": "1",
        "GPU_CHECK_PYTHON": sys.executable,
        "GPU_CHECK_WHEELS": "none",
        "GPU_CHECK_ASSETS": str(assets),
        "GPU_CHECK_SITE": str(out / "site"),
        # this shared 2-core machine imports torch slower than the device's 16 cores
        "GPU_CHECK_STAGE0_S": "90",
        **env,
    }
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=ROOT,
        env=variables,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return result.returncode, result.stdout + result.stderr, rows, seconds


def states(rows: list[dict]) -> dict[tuple[str, str], str]:
    return {(r["section"], r["measure"]): r["value"] for r in rows}


@pytest.mark.parametrize(
    ("card", "part", "planned", "skipped"),
    [
        (H100, "first", ["correctness", "8B bf16", "8B fp8"], []),
        (H200, "first", ["correctness", "8B bf16", "8B fp8"], []),
        (H100, "70b", ["70B fp8"], ["70B bf16"]),  # 131.4 GiB of bf16 weights: no
        (H200, "70b", ["70B fp8", "70B bf16"], []),
    ],
)
def test_the_plan_fits_the_card_and_the_budget(
    tmp_path: Path, assets: Path, card: str, part: str, planned: list, skipped: list
) -> None:
    code, output, rows, _ = dry_run(tmp_path / "out", assets, card, GPU_CHECK_PART=part)
    assert code == 0, output
    got = states(rows)
    assert got[("stage 0", "install, imports, GPU")].startswith("ok"), output
    assert "versions: torch" in output and card.split(",")[0] in output
    sections = {section for section, _ in got} - {"setup", "stage 0"}
    assert sections == set(planned) | set(skipped)
    caps = 0
    for (section, measure), value in got.items():
        if section in planned:
            assert value.startswith("planned (timeout"), (section, measure, value)
            caps += int(value.split()[2])
        if section in skipped:
            assert value.startswith("skipped: needs >= 140 GiB"), (section, measure, value)
    # One call: stage 0's 30 s and every stage at its cap fit 300 s (the budget enforces it).
    assert 30 + caps <= 300, caps
    assert (tmp_path / "out" / "summary.txt").read_text().startswith("section")


def fake_wheel(folder: Path, name: str, module_text: str) -> Path:
    """A valid wheel of package `name` whose module holds `module_text`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-99.0-py3-none-any.whl"
    info = f"{name}-99.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", module_text)
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0\n"
        archive.writestr(f"{info}/METADATA", metadata)
        tags = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{info}/WHEEL", tags)
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.parametrize("broken", ["unreadable wheel", "a package that fails to import"])
def test_stage_0_fails_fast_on_a_broken_install(tmp_path: Path, assets: Path, broken: str) -> None:
    wheels = tmp_path / "wheels"
    if broken == "unreadable wheel":
        wheels.mkdir()
        (wheels / "pydantic-2.0-py3-none-any.whl").write_bytes(b"not a zip")
        want = "wheels: install"
    else:  # installs, then shadows the real fastapi: `import hearth.server.app` fails
        fake_wheel(wheels, "fastapi", "raise ImportError('broken fastapi')\n")
        want = "imports"
    code, output, rows, seconds = dry_run(
        tmp_path / "out", assets, H200, GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_PART="all"
    )
    assert code == 1, output
    value = states(rows)[("stage 0", "install, imports, GPU")]
    assert value.startswith(f"FAILED: {want}"), value
    assert "broken fastapi" in output or broken == "unreadable wheel"
    # at once: no stage planned or run after it, and the table still written
    assert {r["section"] for r in rows} == {"setup", "stage 0"}
    assert "== summary" in output and (tmp_path / "out" / "summary.txt").exists()
    assert seconds < 90


# -- the pinned wheels ------------------------------------------------------------------------


def pins() -> dict[str, Version]:
    return gpu_wheels.parse_pins(gpu_wheels.PINS.read_text())


def test_the_pin_list_is_exact_and_complete() -> None:
    pinned = pins()
    assert not gpu_wheels.pin_problems(pinned)
    assert pinned["starlette"] >= Version("1.6")  # what fastapi 0.1xx needs
    with pytest.raises(ValueError, match="not an exact pin"):
        gpu_wheels.parse_pins("fastapi>=0.115\n")
    with pytest.raises(ValueError, match="pinned twice"):
        gpu_wheels.parse_pins("pydantic==2.1\npydantic==2.2\n")


def test_pins_meet_each_others_requirements_as_installed_here() -> None:
    """Every pinned package installed here at its pinned version: its requirements (markers
    for the device's Python 3.12) met by the pins or the device image. CI's environment comes
    from pyproject.toml's ranges, so a pin it no longer matches is left out, not guessed."""
    pinned = pins()
    requires = {}
    for name, version in pinned.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed == version:
            requires[name] = importlib.metadata.requires(name) or []
    if "pydantic" not in requires:
        pytest.skip("pydantic here is not the pinned one: the pair is checked by gpu_prepare.sh")
    assert not gpu_wheels.requirement_problems(requires, pinned, gpu_wheels.IMAGE)


def test_the_checker_finds_broken_pairs_and_missing_packages() -> None:
    pinned = {canonicalize_name(n): Version(v) for n, v in
              [("pydantic", "2.14.4"), ("pydantic-core", "2.41.0"), ("fastapi", "0.165.0"),
               ("starlette", "0.47.0")]}  # fmt: skip
    requires = {
        "pydantic": ["pydantic-core==2.50.5", "typing-extensions>=4.16.0"],
        "fastapi": [
            "starlette>=1.6.0",
            "opentelemetry-api>=1.44.0",
            "numpy>=99; python_version < '3.10'",  # another Python: ignored
            "httpx>=0.23; extra == 'all'",  # an extra: ignored
            "transformers>=6",  # the image's version is known: 5.17.0
        ],
    }
    problems = gpu_wheels.requirement_problems(requires, pinned, gpu_wheels.IMAGE)
    assert problems == [
        "fastapi needs starlette>=1.6.0, pinned starlette==0.47.0",
        "fastapi needs opentelemetry-api>=1.44.0: neither pinned nor in the device image",
        "fastapi needs transformers>=6, the device image has 5.17.0",
        "pydantic needs pydantic-core==2.50.5, pinned pydantic-core==2.41.0",
    ]


def test_a_wheel_folder_is_checked_against_the_pins(tmp_path: Path) -> None:
    folder = tmp_path / "whl"
    fake_wheel(folder, "pydantic", "")
    fake_wheel(folder, "extra_thing", "")
    problems = gpu_wheels.check_folder(folder, pins())
    assert "pydantic: wheel 99.0, pinned 2.14.4" in problems
    assert "extra-thing: a wheel that is not pinned" in problems
    assert "fastapi==0.165.0: no wheel in " + str(folder) in problems


@pytest.mark.skipif(not (ROOT / ".whl").is_dir(), reason="no .whl: bench/gpu_prepare.sh not run")
def test_the_prepared_wheels_are_consistent() -> None:
    assert gpu_wheels.check_folder(ROOT / ".whl", pins()) == []

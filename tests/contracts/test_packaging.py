"""The installed distribution: one top-level name, `hearth` (engine and server are links in it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from hearth.server.ui_route import FILES as UI_FILES  # the chat page, server/ui

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("hearth", "engine", "server")  # hearth/engine and hearth/server link to the other two


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_found() -> None:
    """setuptools finds exactly the folders holding an __init__.py under hearth/ (through its
    links), and maps no folder elsewhere: one path per module."""
    from setuptools import find_packages

    setuptools = pyproject()["tool"]["setuptools"]
    assert "package-dir" not in setuptools
    for name in ("engine", "server"):
        link = ROOT / "hearth" / name
        assert link.is_symlink() and link.resolve() == ROOT / name
    found = set()
    for folder, _, files in os.walk(ROOT / "hearth", followlinks=True):
        if "__init__.py" in files:
            found.add(".".join(("hearth", *Path(folder).relative_to(ROOT / "hearth").parts)))
    include = setuptools["packages"]["find"]["include"]
    assert set(find_packages(where=str(ROOT), include=include)) == found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "models.yaml"):
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:  # the links are copied as links: the build must follow them
        shutil.copytree(
            ROOT / folder, src / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("hearth-*.whl")
    return built


def test_wheel_installs_only_hearth(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"hearth", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for path in (
        "hearth/cli.py",
        "hearth/engine/core.py",
        "hearth/engine/kernels/csrc/cpu_kernels.cpp",
        "hearth/engine/kernels/csrc/gguf_kernels.cpp",
        "hearth/server/app.py",
        "hearth/server/ui_route.py",
        *(f"hearth/server/ui/{name}" for name in UI_FILES),
    ):
        assert path in names
    shipped = zipfile.ZipFile(wheel).read("hearth/models.yaml").decode()
    assert shipped == (ROOT / "models.yaml").read_text()  # the link's target, not the link


def test_wheel_runs_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel, run from a folder whose engine/ and server.py would shadow it."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    work = tmp_path / "work"
    (work / "engine").mkdir(parents=True)
    (work / "engine" / "__init__.py").write_text("raise SystemExit('shadowed engine')\n")
    (work / "server.py").write_text("raise SystemExit('shadowed server')\n")
    code = (
        "import importlib.util, hearth.engine.core, hearth.server.app, hearth.cli;"
        "print(hearth.engine.core.__file__);"
        "print(importlib.util.find_spec('hearth.engine.kernels.cpu_kernels').origin);"
        "from hearth.launch import select_models;"
        "print('models:' + ','.join(m.id for m in select_models().models))"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    *paths, models = out.stdout.split()
    for line in paths:
        assert line.startswith(str(site / "hearth")), line
    assert models == "models:SmolLM2-135M-Instruct"  # no ./models.yaml here: the packaged one
    help_out = subprocess.run(
        [sys.executable, "-m", "hearth", "--help"], cwd=work, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert help_out.returncode == 0 and "serve" in help_out.stdout, help_out.stderr[-2000:]


def test_editable_install_exposes_no_engine_or_server(tmp_path: Path) -> None:
    """The development install (make install: pip install -e) maps the same single name."""
    code = (
        "import importlib.util as u;"
        "print(u.find_spec('engine'), u.find_spec('server'), u.find_spec('hearth.engine').origin)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    engine, server, origin = out.stdout.split()
    assert (engine, server) == ("None", "None")
    assert origin == str(ROOT / "hearth" / "engine" / "__init__.py")  # one path: through the link

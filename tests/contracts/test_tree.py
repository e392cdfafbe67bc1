"""The tree a newcomer reads: docs/architecture.md's map matches it, product files stay small, and
each kind of test stays in its folder (tests/unit imports no torch)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

from tests.fixtures.server import ROOT

MAP = ROOT / "docs" / "architecture.md"
PRODUCT = ("engine", "server", "hearth")
TEST_KINDS = ("unit", "engine", "live", "contracts")
TOPS = ("engine/", "server/", "hearth/", "tests/", "bench/", "docs/", "deploy/")


def mapped_paths() -> set[str]:
    """Every path the map's "One line per room" table names in its first column. Names that do
    not start at the top belong to the folder of the name before them (`engine/core.py`,
    `runner.py`; `engine/kernels/`: `csrc/`)."""
    text = MAP.read_text()
    table = text[text.index("## One line per room") :].split("\n## ")[0]
    paths: set[str] = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        base = ""
        for name in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if not name.startswith(TOPS):
                name = base + name
            elif "/" in name:
                base = name if name.endswith("/") else name.rsplit("/", 1)[0] + "/"
            paths.add(name)
    return paths


def packages() -> list[str]:
    """Every product folder with an __init__.py, as `engine/lora/` (the top folders included)."""
    found = []
    for top in PRODUCT:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            found.append(init.parent.relative_to(ROOT).as_posix() + "/")
    return found


def test_every_path_the_map_names_exists() -> None:
    paths = mapped_paths()
    assert len(paths) > 60, len(paths)  # the table was read
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names what is not in the tree: {missing}"


def test_every_package_is_on_the_map() -> None:
    paths = mapped_paths()
    unnamed = [p for p in packages() if not any(q == p or q.startswith(p) for q in paths)]
    assert not unnamed, f"packages missing from docs/architecture.md's table: {unnamed}"


def test_every_engine_and_server_module_is_on_the_map() -> None:
    """A new module at the top of engine/ or server/ gets its line (package insides may be
    described by their folder)."""
    paths = mapped_paths()
    unnamed = []
    for top in ("engine", "server"):
        for path in sorted((ROOT / top).glob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name != "__init__.py" and rel not in paths:
                unnamed.append(rel)
    assert not unnamed, f"modules missing from docs/architecture.md's table: {unnamed}"


def test_long_product_files_say_why() -> None:
    """Roughly 300 lines a module; past 350 the module docstring says why it stays whole."""
    long = []
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.is_relative_to(ROOT / "hearth" / "engine") or path.is_relative_to(
                ROOT / "hearth" / "server"
            ):
                continue  # the links: the same files as engine/ and server/
            text = path.read_text()
            doc = ast.get_docstring(ast.parse(text)) or ""
            if text.count("\n") > 350 and "Longer than" not in doc:
                long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, long


def test_tests_live_in_their_kind_folder() -> None:
    loose = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert not loose, f"tests go in tests/{{{','.join(TEST_KINDS)}}}/: {loose}"
    for kind in TEST_KINDS:
        assert (ROOT / "tests" / kind / "__init__.py").exists()


def test_unit_tests_import_no_torch() -> None:
    """tests/unit is the fast, torch-free kind: importing all of it loads neither torch nor
    transformers (a test that needs them belongs in tests/engine)."""
    modules = [
        p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        for p in sorted((ROOT / "tests" / "unit").glob("test_*.py"))
    ]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout))
    assert len(modules) > 10
    assert not {"torch", "transformers"} & loaded

"""Every `hearth.*` import in the product code resolves to its file for a static tool (jedi, the
engine behind many editors' go-to-definition), from the installed package alone: the editable
install `make install` makes, or a regular one. See docs/architecture.md, "One path per module"."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from tests.fixtures.server import ROOT

jedi = pytest.importorskip("jedi")

PRODUCT = ("hearth", "engine", "server")  # the folders the installed `hearth` is made of


def product_files() -> list[Path]:
    files = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files.append(path)
    return [f for f in files if not (f.parent == ROOT / "hearth" and f.name in PRODUCT)]


def hearth_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of each `import hearth.x` / `from hearth.x import name`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("hearth")]
            found += [(name, None, node.lineno) for name in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hearth"):
            found += [(node.module, a.name, node.lineno) for a in node.names]
    return found


def test_every_hearth_import_resolves_to_a_file_of_the_repository(tmp_path: Path) -> None:
    """jedi, run from an empty folder (so the checkout is not on its path: only the environment's
    install can lead it there), goes from each import to a file that is the module's own: the
    product's imports, and the benchmarks' (often inside functions, where no test imports them)."""
    environment = jedi.create_environment(sys.prefix, safe=False)
    project = jedi.Project(tmp_path, environment_path=sys.prefix, smart_sys_path=False)
    unresolved, checked = [], 0
    for path in [*product_files(), *sorted(ROOT.glob("bench/*.py"))]:
        for module, name, line in hearth_imports(path):
            code = f"import {module}" if name is None else f"from {module} import {name}"
            script = jedi.Script(code, path=tmp_path / "probe.py", project=project,
                                 environment=environment)  # fmt: skip
            targets = script.goto(1, len(code) - 1, follow_imports=True)
            files = {Path(os.path.realpath(t.module_path)) for t in targets if t.module_path}
            checked += 1
            if not files or not all(f.is_relative_to(ROOT) for f in files):
                unresolved.append(f"{path.relative_to(ROOT)}:{line}: {code} -> {files or None}")
    assert checked > 500, checked  # the product's hearth.* imports (about 600 when written)
    assert not unresolved, "\n".join(unresolved)


def test_no_module_is_importable_under_a_second_name() -> None:
    """The repository's engine/ and server/ are reached only as hearth.engine / hearth.server:
    no code imports them by their folder names, which would load each module twice."""
    offenders = []
    for path in [*product_files(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in ("engine", "server")]
    assert not offenders

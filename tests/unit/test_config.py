"""models.yaml validation: the shipped file, and one-line errors for bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hearth.engine.config import ConfigError, load_config, parse_config, resolve_sources
from hearth.engine.loading.sources import SourceError, resolve_source

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_shipped_config_serves_the_default_model() -> None:
    config = load_config(ROOT / "models.yaml")
    assert [m.id for m in config.models] == ["SmolLM2-135M-Instruct"]
    model = config.models[0]
    assert model.dtype == "auto" and model.device == "auto"
    sources = resolve_sources(config, "models.yaml", ROOT)
    assert sources[model.id].kind == "gguf"
    assert sources[model.id].location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    text = (ROOT / "models.yaml").read_text()
    assert "# - id: Llama-3.1-8B-Instruct" in text and "# - id: Llama-3.3-70B-Instruct" in text


def test_unknown_key_names_file_model_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - id: m1\n    source: org/name\n    dtyp: float32\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message == f"{path}: model 'm1': unknown key 'dtyp'"


def test_nested_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - id: m1\n    source: a/b\n    engine: {max_num_seqz: 4}\n")
    with pytest.raises(ConfigError, match=r"model 'm1': unknown key 'engine.max_num_seqz'"):
        load_config(path)
    path = write(tmp_path, "models:\n  - id: m2\n    source: a/b\n    max_model_len: lots\n")
    with pytest.raises(ConfigError, match=r"model 'm2': key 'max_model_len': .*integer.*'lots'"):
        load_config(path)


def test_bad_values(tmp_path: Path) -> None:
    cases = {
        "dtype: float8": "key 'dtype'",
        "device: tpu": "key 'device'",
        "aliases: [x, x]": "used twice",
        "defaults: {temperature: 9}": "key 'defaults.temperature'",
        "engine: {kv_cache_memory: lots}": "key 'engine.kv_cache_memory'",
    }
    for line, expected in cases.items():
        path = write(tmp_path, f"models:\n  - id: m\n    source: a/b\n    {line}\n")
        with pytest.raises(ConfigError, match=expected):
            load_config(path)


def test_dtype_aliases_and_byte_sizes() -> None:
    raw = {
        "models": [
            {"id": "m", "source": "a/b", "dtype": "bf16", "engine": {"kv_cache_memory": "2GiB"}}
        ]
    }
    model = parse_config(raw).models[0]
    assert model.dtype == "bfloat16"
    assert model.engine.kv_cache_memory == 2 << 30


def test_missing_key_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model 'm': missing key 'source'"):
        load_config(write(tmp_path, "models:\n  - id: m\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_config(write(tmp_path, "models: [\n"))


def test_missing_source_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - id: m\n    source: ./weights/none.gguf\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as err:
        resolve_sources(config, str(path), tmp_path)
    assert str(err.value) == f"{path}: model 'm': key 'source': file not found: ./weights/none.gguf"


def test_sources(tmp_path: Path) -> None:
    assert resolve_source("meta-llama/Llama-3.1-8B-Instruct").kind == "hub"
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SourceError, match=r"no config\.json"):
        resolve_source(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert resolve_source("ckpt", base_dir=tmp_path).kind == "dir"
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "w.gguf").write_bytes(b"GGUF")
    found = resolve_source(str(tmp_path / "g"))
    assert (found.kind, found.gguf_name) == ("gguf", "w.gguf")
    with pytest.raises(SourceError, match="not installed"):
        resolve_source("package:no_such_package_xyz/f.gguf")
    with pytest.raises(SourceError, match="not found"):
        resolve_source("just-a-name")


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hearth", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - id: SmolLM2\n    source: org/name\n    max_num_seq: 4\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "'max_num_seq'" in result.stderr and "bad.yaml" in result.stderr
    assert "SmolLM2" in result.stderr


def test_cli_missing_model_path_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path / "nothing.gguf"), cwd=tmp_path)
    assert result.returncode == 2
    assert "file not found" in result.stderr and "Traceback" not in result.stderr


def test_cli_help_explains_every_flag() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for flag in (
        "--config",
        "--model",
        "--host",
        "--port",
        "--api-key",
        "--device",
        "--dtype",
        "--log-level",
    ):
        assert flag in result.stdout
    assert run_cli("--help").returncode == 0


def test_serve_flag_defaults_are_the_settings_defaults() -> None:
    """One source of truth: `hearth serve` without flags runs ServerSettings' defaults."""
    import dataclasses

    from hearth.cli import build_parser, server_settings
    from hearth.paths import default_files_dir, default_responses_db
    from hearth.server.settings import ServerSettings

    args = build_parser().parse_args(["serve"])
    settings = server_settings(args, ())
    # the exceptions: `hearth serve` keeps responses and files in the data dir, apps built
    # in-process in memory (a temporary folder)
    assert settings.responses_db == default_responses_db()
    assert settings.files_dir == default_files_dir()
    kept = dataclasses.replace(settings, responses_db=":memory:", files_dir=":memory:")
    assert kept == ServerSettings()
    serve_help = run_cli("serve", "--help").stdout
    assert "(default: 4MiB)" in serve_help and "(default: 600)" in serve_help
    assert "(default 0.9;" in serve_help
    assert "{auto,none,fp8,gguf}" in serve_help

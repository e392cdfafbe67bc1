"""Which LoRA adapters `hearth serve` serves: models.yaml's `loras` and the `--lora` flags."""

from __future__ import annotations

from pathlib import Path

from hearth.engine.config import ConfigError, LoraConfig, ModelConfig, lora_base


def absolute(lora: LoraConfig, base_dir: Path) -> LoraConfig:
    """A relative adapter path that exists next to the config, made absolute."""
    path = Path(lora.source).expanduser()
    if not path.is_absolute() and (base_dir / path).exists():
        return lora.model_copy(update={"source": str(base_dir / path)})
    return lora


def select_loras(
    models: list[ModelConfig], config_loras: list[LoraConfig], flags: list[str], name: str
) -> list[tuple[LoraConfig, str]]:
    """(adapter, base model id) of the config's adapters whose base is served, then --lora's."""
    served = {n for m in models for n in m.names}
    chosen = []
    for lora in config_loras:
        if lora.base is None or lora.base in served:
            try:
                chosen.append((lora, lora_base(models, lora)))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    for flag in flags:
        lora_id, sep, path = flag.partition("=")
        if not sep or not lora_id or not path:
            raise ConfigError(f"--lora: expected ID=PATH (got {flag!r})")
        lora = LoraConfig(id=lora_id, source=str(Path(path).expanduser()))
        try:
            chosen.append((lora, lora_base(models, lora)))
        except ValueError as exc:
            raise ConfigError(f"--lora: {exc}") from None
    names = [n for m in models for n in m.names] + [lora.id for lora, _ in chosen]
    for lora, _ in chosen:
        if names.count(lora.id) > 1:
            raise ConfigError(f"{name}: model name {lora.id!r} is used twice")
    return chosen

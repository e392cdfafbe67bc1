"""models.yaml: pydantic schema, loading, and one-line error messages (torch-free).

Longer than ~300 lines on purpose: the schema of one file, whose sections (engine settings,
embedding, rerank, load policy, memory budgets) are validated together with cross-field rules and
share one error formatter; split, a reader would chase one document through several modules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hearth.engine.loading.sources import Source, SourceError, resolve_source

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: float | str) -> float:
    """Seconds of a keep_alive: a number of seconds, or Go-style text ("30s", "5m", "1h30m",
    "500ms", Ollama's spelling); any negative value means never (returned as -1.0).
    ValueError if unreadable."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return -1.0 if value < 0 else float(value)
    text = str(value).strip()
    try:
        return parse_duration(float(text))
    except ValueError:
        pass
    if text.startswith("-"):
        return -1.0
    if not text or _DURATION.sub("", text):
        raise ValueError(f"not a duration: {value!r} (seconds, or e.g. 30s, 5m, 1h; -1: never)")
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))


class ConfigError(Exception):
    """An invalid configuration; str() is one line naming the file, the model id and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(_Strict):
    """Defaults applied where a request leaves a sampling field unset."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)


class EngineSettings(_Strict):
    """One model's engine settings: scheduler and KV-cache sizes, kernel choices, autotune."""

    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together at most")
    max_num_batched_tokens: int = Field(2048, ge=16, description="tokens per step (prefill chunk)")
    max_waiting: int = Field(1024, ge=0, description="queued requests before 429")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    kv_cache_memory: ByteSize | None = Field(
        None, description="KV budget in bytes ('2GiB'); default: 1 GiB on CPU"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory for weights plus KV cache"
    )
    decode_kernel: Literal["auto", "sdpa", "triton", "cpu"] = Field(
        "auto",
        description="decode attention: triton (CUDA) and cpu (a C++ kernel built with the "
        "system compiler; float32) read the paged cache in place, sdpa gathers the blocks and "
        "calls SDPA; auto: triton on one CUDA device, cpu on CPU, where they can run, else sdpa",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="replay pure decode steps as CUDA graphs (needs the triton kernel); "
        "default: on where the triton kernel runs on one CUDA device",
    )
    cpu_matmul: bool | None = Field(
        None,
        description="small-batch matmuls of float32 CPU models through a C++ kernel over "
        "packed copies of the linear weights (more memory: the weights' size again); "
        "default: on where the cpu decode kernel runs",
    )
    fused_kernels: bool | None = Field(
        None,
        description="Triton kernels for RMSNorm and SiLU(gate) * up (Llama, Mistral, Qwen2/3); "
        "default: on where the triton decode kernel runs",
    )

    max_loras: int = Field(
        4, ge=1, description="LoRA adapters held on the device at once (slots; LRU eviction)"
    )
    max_lora_rank: int = Field(64, ge=1, description="largest LoRA rank an adapter may have")

    autotune: Literal["auto", "off", "remeasure"] = Field(
        "auto",
        description="auto: time every kernel choice left to auto (and, on CPU, the thread "
        "count) on this model's shapes at first start and keep the fastest correct one, cached "
        "per machine and model; remeasure: ignore the cache; off: no measuring (PyTorch's own "
        "paths on CPU; Triton, graphs and fused kernels on one GPU)",
    )

    @model_validator(mode="after")
    def _graphs_need_the_kernel(self) -> EngineSettings:
        if self.cuda_graphs and self.decode_kernel in ("sdpa", "cpu"):
            raise ValueError("cuda_graphs needs decode_kernel: triton (or auto)")
        return self


class EmbeddingSettings(_Strict):
    """An embedding model's pooling and limits (`task: embed`); `auto` reads the checkpoint's
    sentence-transformers files (engine/embedding/pooling.py)."""

    pooling: Literal["auto", "cls", "mean", "last"] = Field(
        "auto", description="auto: 1_Pooling/config.json; without one, last for decoders, cls else"
    )
    normalize: bool | None = Field(None, description="L2-normalise; default: a Normalize module")
    matryoshka_dimensions: list[int] | None = Field(
        None, description="`dimensions` a request may ask for (truncate + renormalise)"
    )
    default_prompt_name: str | None = Field(
        None, description="instruction prefix (a `prompts` key) for text inputs; default: ST's"
    )
    max_inputs: int = Field(2048, ge=1, description="inputs per request at most (400 beyond)")


class RerankSettings(_Strict):
    """A rerank model's scoring (`task: rerank`, alias `score`; engine/rerank/scoring.py).

    A `*ForSequenceClassification` checkpoint is a cross-encoder: its one logit through the
    activation sentence-transformers' CrossEncoder uses. A `*ForCausalLM` checkpoint is a decoder
    reranker: each pair is written into `template` and scored by the model's next-token logits of
    `answer_tokens` (negative, positive): softmax over the two, the positive one's probability.
    """

    activation: Literal["auto", "sigmoid", "identity", "tanh"] = Field(
        "auto",
        description="cross-encoders: auto takes the activation_fn the checkpoint names "
        "(config_sentence_transformers.json, else config.json), else sigmoid, as CrossEncoder does",
    )
    template: str | None = Field(
        None,
        description="decoder rerankers: the prompt with {query}, {document} (and {instruction}); "
        "'qwen3': Qwen3-Reranker's (the default for a Qwen3 checkpoint)",
    )
    instruction: str | None = Field(None, description="what {instruction} becomes")
    answer_tokens: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="decoder rerankers: [negative, positive] answer tokens; default: "
        "config.json's classifier_from_token, else the template preset's",
    )
    max_inputs: int = Field(1024, ge=1, description="documents per request at most (400 beyond)")


class SpeculativeConfig(_Strict):
    """Speculative decoding (engine/spec_decode/): draft tokens proposed cheaply and verified
    by the model in one forward; lossless (the output is distributed as without it)."""

    method: Literal["ngram", "draft"] = Field(
        description="ngram: prompt lookup in the request's own tokens (no model); draft: a "
        "smaller model sharing the tokenizer (`draft`)"
    )
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="draft tokens per step")
    draft: str | None = Field(
        None, description="method draft: the draft model's source (dir, hub id, .gguf, package:)"
    )
    prompt_lookup_min: int = Field(2, ge=1, description="ngram: shortest n-gram matched")
    prompt_lookup_max: int = Field(4, ge=1, description="ngram: longest n-gram matched")
    max_batch: int | None = Field(
        None,
        ge=0,
        description="speculate only while at most this many sequences run; default: measured "
        "on this host (up to where a verification pays with half its drafts accepted), cached",
    )

    @model_validator(mode="after")
    def _draft_source(self) -> SpeculativeConfig:
        if (self.method == "draft") != (self.draft is not None):
            raise ValueError("speculative: 'draft' names the draft model, with method: draft")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative: prompt_lookup_min exceeds prompt_lookup_max")
        return self


class ModelConfig(_Strict):
    """One served model."""

    id: str = Field(min_length=1, description="what clients send as `model`")
    source: str = Field(
        min_length=1, description="local dir, hub id, .gguf file or package:pkg/file"
    )
    aliases: list[str] = Field(default_factory=list)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    device_map: Literal["auto"] | dict[str, Any] | None = None
    max_model_len: int | None = Field(None, ge=16)
    chat_template: str | None = Field(None, description="Jinja text, or a path to a .jinja file")
    quantization: Literal["auto", "none", "fp8", "gguf"] = Field(
        "auto",
        description="weights kept quantized in memory: fp8 (e4m3, per-channel scales; the "
        "GPU's fp8 matmuls where it has them), gguf (a GGUF file's own blocks, read by hearth's "
        "CPU kernels); auto: what the checkpoint ships (a GGUF on CPU, an fp8 checkpoint), "
        "else none",
    )
    load_format: Literal["auto", "dummy"] = Field(
        "auto",
        description="dummy: random weights from the checkpoint's config, built on the device "
        "(benchmarks of shapes whose weights are not at hand; vLLM's --load-format dummy)",
    )
    tool_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        "auto", description="tool-call format; auto: from the chat template"
    )
    reasoning_parser: Literal["auto", "none", "think_tags"] = Field(
        "auto",
        description="how the model's thinking is split from its answer (reasoning_content): "
        "think_tags (<think>...</think>: DeepSeek-R1 distills, Qwen3, QwQ); auto: think_tags "
        "when the chat template knows <think> blocks, else none",
    )
    task: Literal["generate", "embed", "rerank"] = Field(
        "generate",
        description="generate: chat and completions; embed: /v1/embeddings; rerank (alias "
        "score): /v1/rerank and /score",
    )
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    revision: str | None = None
    trust_remote_code: bool = False
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs (processes, under torchrun) the weights are split over"
    )
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    speculative: SpeculativeConfig | None = None
    load: Literal["at_start", "on_demand"] | None = Field(
        None,
        description="at_start: loaded before serving; on_demand: on its first request (the "
        "request waits). Default: at_start when one model is served, on_demand for several",
    )
    keep_alive: float | None = Field(
        None,
        description="idle time before unloading: seconds or 30s/5m/1h; -1: never; 0: right "
        "after the last request. Default: -1 at start, 5m on demand (Ollama's)",
    )
    memory: ByteSize | None = Field(
        None,
        description="bytes it takes on its device (weights, KV cache, workspace) for the "
        "memory budget; default: estimated from the checkpoint and engine settings",
    )

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("dtype"), str):
            data = {**data, "dtype": _DTYPE_ALIASES.get(data["dtype"], data["dtype"])}
        if isinstance(data, dict) and data.get("task") == "score":  # vLLM's name for it
            data = {**data, "task": "rerank"}
        return data

    @model_validator(mode="after")
    def _device_or_map(self) -> ModelConfig:
        if self.device_map is not None and self.device not in ("auto", "cuda"):
            raise ValueError("set either device or device_map, not both")
        if self.device_map is not None and self.tensor_parallel_size > 1:
            raise ValueError("set either device_map or tensor_parallel_size, not both")
        return self

    @property
    def names(self) -> list[str]:
        return [self.id, *self.aliases]


class LoraConfig(_Strict):
    """A LoRA adapter served under its own model id (a PEFT directory: engine/lora/adapter.py)."""

    id: str = Field(min_length=1, description="what clients send as `model`")
    source: str = Field(min_length=1, description="PEFT adapter dir, or a hub id in the cache")
    base: str | None = Field(None, description="the base model's id; default: the only one")


class HearthConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    loras: list[LoraConfig] = Field(default_factory=list)
    allow_runtime_lora: bool = Field(
        False, description="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter"
    )
    memory_budget: dict[str, ByteSize] = Field(
        default_factory=dict,
        description="bytes the loaded models may take per device (cpu: host RAM, cuda:0, "
        "...): a model that does not fit evicts idle ones; default: 90% of each device",
    )

    @field_validator("memory_budget")
    @classmethod
    def _devices(cls, value: dict[str, ByteSize]) -> dict[str, ByteSize]:
        for device in value:
            if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
                raise ValueError(f"memory_budget: unknown device {device!r} (cpu, cuda:N)")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> HearthConfig:
        seen: set[str] = set()
        for name in [n for model in self.models for n in model.names] + [a.id for a in self.loras]:
            if name in seen:
                raise ValueError(f"model name {name!r} is used twice")
            seen.add(name)
        for lora in self.loras:
            lora_base(self.models, lora)
        return self


def lora_base(models: list[ModelConfig], lora: LoraConfig) -> str:
    """The id of the generation model `lora` adapts; ValueError naming the adapter if none."""
    bases = [m.id for m in models if m.task == "generate"]
    if lora.base is None:
        if len(bases) != 1:
            raise ValueError(f"LoRA adapter {lora.id!r}: set 'base' (one of {bases})")
        return bases[0]
    match = [m.id for m in models if lora.base in m.names]
    if not match or match[0] not in bases:
        raise ValueError(f"LoRA adapter {lora.id!r}: base {lora.base!r} is not a served model")
    return match[0]


def _describe(error: dict[str, Any], raw: Any, filename: str) -> str:
    """One line from the first pydantic error: file, model id, key, problem."""
    loc = list(error["loc"])
    where = filename
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        entry = raw["models"][loc[1]] if isinstance(raw, dict) else None
        model_id = entry.get("id") if isinstance(entry, dict) else None
        where += f": model {model_id!r}" if model_id else f": models[{loc[1]}]"
        loc = loc[2:]
    key = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key {key!r}"
    if error["type"] == "missing":
        return f"{where}: missing key {key!r}"
    message = error["msg"].removeprefix("Value error, ")
    if key:
        got = error.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
        return f"{where}: key {key!r}: {message}{shown}"
    return f"{where}: {message}"


def parse_config(raw: Any, filename: str = "<config>") -> HearthConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{filename}: expected a mapping with a 'models' list")
    try:
        return HearthConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], raw, filename)) from None


def load_config(path: str | Path) -> HearthConfig:
    """Read and validate models.yaml; raises ConfigError with a one-line message."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{path}: cannot read YAML: {detail}") from None
    return parse_config(raw, str(path))


def resolve_sources(config: HearthConfig, filename: str, base_dir: Path) -> dict[str, Source]:
    """Check every model's source now (local files must exist), before any loading."""
    resolved = {}
    for model in config.models:
        try:
            resolved[model.id] = resolve_source(model.source, base_dir)
        except SourceError as exc:
            raise ConfigError(f"{filename}: model {model.id!r}: key 'source': {exc}") from None
    return resolved

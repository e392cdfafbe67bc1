"""The base of every request model (unknown fields ignored, `null` meaning "not given"), and the
request fields chat, completions and responses share (sampling, stream options, function tools).

Gateways and SDKs serialise unset optional fields as `null`. OpenAI treats such a `null` exactly
as if the field were absent, so a `null` on a field with a default is dropped before validation
and the default applies. A `null` on a required field is kept (and refused as missing a value).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticUndefined

from hearth.engine.types import SamplingParams


class ParamError(ValueError):
    """A cross-field check failed; `param` names the offending field (relative to the model)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@cache
def _defaulted_keys(model: type[BaseModel]) -> frozenset[str]:
    """Names and aliases of the fields whose default is not None."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        has_default = info.default_factory is not None or (
            info.default is not PydanticUndefined and info.default is not None
        )
        if has_default:
            keys.add(name)
            if info.alias:
                keys.add(info.alias)
    return frozenset(keys)


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaulted = _defaulted_keys(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}


# -- fields features share ---------------------------------------------------------------------


class FunctionDef(WireModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class StreamOptions(WireModel):
    include_usage: bool = False


class SamplingFields(WireModel):
    """Sampling fields shared by chat and completions; None means 'use the model's default'."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM-style extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM: score the prompt's tokens
    # hearth: false opts this request out of the model's speculative decoding
    speculative: bool = True
    # vLLM's: lower is scheduled first (engine/scheduler.py); batch lines run last. A client may
    # only yield (>= 0): a negative value would let any caller preempt everyone else
    priority: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():  # the vocabulary's size is checked by the engine
                raise ValueError(f"logit_bias keys must be token ids (0 or more), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return value

    def sampling_params(
        self, max_tokens: int, defaults: dict[str, Any], logprobs: int | None
    ) -> SamplingParams:
        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        top_k = pick("top_k", 0)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=0 if top_k == -1 else top_k,
            min_p=pick("min_p", 0.0),
            presence_penalty=pick("presence_penalty", 0.0),
            frequency_penalty=pick("frequency_penalty", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=self.seed,
            n=self.n,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            speculative=self.speculative,
            priority=self.priority,
        )


def check_stream_options(request: SamplingFields) -> None:
    if request.stream_options is not None and not request.stream:
        raise ParamError("stream_options", "stream_options is only allowed when stream is true")

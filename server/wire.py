"""The base of every request model: unknown fields ignored, `null` meaning "not given".

Gateways and SDKs serialise unset optional fields as `null`. OpenAI treats such a `null` exactly
as if the field were absent, so a `null` on a field with a default is dropped before validation
and the default applies. A `null` on a required field is kept (and refused as missing a value).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticUndefined


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

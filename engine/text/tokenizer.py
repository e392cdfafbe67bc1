"""Tokenizer facade: plain and chat-template encoding, decoding, and the stop token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hearth.engine.text.token_bytes import TokenBytes, TokenPiece
from hearth.engine.types import InvalidRequestError

# apply_chat_template's own arguments: a request's chat_template_kwargs never set these
_RESERVED = frozenset(
    {
        "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length",
        "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


class TemplateError(InvalidRequestError):
    """The chat template could not render these messages (a client error). No `param` of its
    own: the route names the field it rendered (`messages` in chat, `input` in responses)."""


def render_chat(
    renderer: Any,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> str:
    """The conversation as text through `renderer.apply_chat_template` (a tokenizer or a
    processor), with the generation prompt. `template_kwargs` are more template variables; they
    cannot replace the arguments hearth sets. Raises TemplateError for template failures."""
    extra = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED}
    try:
        return renderer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=True,
            tokenize=False,
            **extra,
        )
    except Exception as exc:  # jinja2 errors, raise_exception() in templates
        raise TemplateError(f"chat template error: {exc}") from None


class ChatTokenizer:
    def __init__(self, tokenizer: Any, generation_config: Any = None) -> None:
        self.hf = tokenizer
        self.eos_token_ids = self._eos_ids(tokenizer, generation_config)
        self._bytes = TokenBytes(tokenizer)

    @staticmethod
    def _eos_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
        ids: set[int] = set()
        for value in (
            getattr(generation_config, "eos_token_id", None),
            getattr(tokenizer, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(v for v in value if isinstance(v, int))
        return frozenset(ids)

    @property
    def template_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself."""
        return "tools" in (getattr(self.hf, "chat_template", None) or "")

    def tool_parser(self, configured: str = "auto") -> str:
        """The tool-call format: as configured, else read from the template (default Hermes)."""
        template = getattr(self.hf, "chat_template", None) or ""
        if configured != "auto":
            return configured
        if "<|python_tag|>" in template or "ipython" in template:
            return "llama3_json"
        return "hermes"

    def reasoning_parser(self, configured: str = "auto") -> str:
        """How the model's thinking is told apart: as configured, else `think_tags` when the
        template knows `<think>` blocks (R1 distills, Qwen3, QwQ), else `none`."""
        if configured != "auto":
            return configured
        template = getattr(self.hf, "chat_template", None) or ""
        return "think_tags" if "<think>" in template or "reasoning_content" in template else "none"

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The rendered conversation's token ids. `template_kwargs` are more variables for the
        template (a request's `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`); they
        cannot replace the arguments hearth sets (messages, tools, add_generation_prompt)."""
        if not getattr(self.hf, "chat_template", None):
            raise TemplateError("this model has no chat template; set chat_template in models.yaml")
        rendered = render_chat(self.hf, messages, tools, template_kwargs)
        # Templates include their own special tokens (BOS where wanted).
        return list(self.hf(rendered, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_pieces(self, token_ids: Sequence[int]) -> list[TokenPiece]:
        """Each token's raw bytes and whether it is special (see engine/text/token_bytes.py)."""
        return self._bytes.pieces(token_ids)

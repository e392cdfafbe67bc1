"""The Responses API response object (OpenAI's Response): what it echoes of the request, its
status, output items and usage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hearth.engine.types import SamplingParams
from hearth.server.context import new_id
from hearth.server.responses.output import OutputItems, StreamEvent, response_usage
from hearth.server.responses.protocol import ResponseRequest


@dataclass
class Reply:
    """One response under construction: what its object echoes of the request, and ids."""

    body: ResponseRequest
    sampling: SamplingParams
    prompt_tokens: int
    cached_tokens: int = 0  # of the prompt's, served from the prefix cache (set as outputs come)
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def snapshot(self, status: str, **outcome: Any) -> dict[str, Any]:
        """The response object in `status`; `outcome` overrides output, usage, error, ..."""
        body = self.body
        text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": body.background is True,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "model": body.model,
            "output": [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {
                "effort": body.reasoning.effort if body.reasoning else None,
                "summary": body.reasoning.summary if body.reasoning else None,
            },
            "service_tier": "default",
            "store": body.store is not False,
            "temperature": self.sampling.temperature,
            "text": text or {"format": {"type": "text"}},
            "tool_choice": _tool_choice(body),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_p": self.sampling.top_p,
            "top_logprobs": body.top_logprobs,
            "truncation": body.truncation,
            "usage": None,
            "user": body.user,
            "metadata": body.metadata or {},
            **outcome,
        }

    def finish(
        self,
        items: OutputItems,
        finish_reason: str | None,
        output_tokens: int,
        error: str | None = None,
        reasoning_tokens: int | None = None,
    ) -> tuple[dict[str, Any], list[StreamEvent]]:
        """The final object (completed, incomplete at max_output_tokens, or failed), and the
        events that close its open items (none when it failed). `reasoning_tokens`: the count
        when `items` was not fed token counts."""
        if error is not None or finish_reason in ("error", "abort"):
            message = error or f"generation stopped: {finish_reason}"
            status, outcome = "failed", {"error": {"code": "server_error", "message": message}}
        elif finish_reason == "length":
            status, outcome = "incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}
        else:
            status, outcome = "completed", {"completed_at": int(time.time())}
        closing = items.finish("completed" if status == "completed" else "incomplete")
        if reasoning_tokens is None:
            reasoning_tokens = items.reasoning_tokens
        response = self.snapshot(
            status,
            output=items.items,
            usage=response_usage(
                self.prompt_tokens, output_tokens, reasoning_tokens, self.cached_tokens
            ),
            **outcome,
        )
        return response, [] if status == "failed" else closing


def _tool_choice(body: ResponseRequest) -> Any:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump()

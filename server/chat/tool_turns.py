"""Tool calls and their results checked against each other, for a whole chat history at once.

OpenAI refuses a conversation whose tool turns do not pair up; so does hearth, with one check
for the kind (ChatCompletionRequest's validator calls `check_tool_turns`):

- a `tool` message must have a `tool_call_id`;
- it must answer a call of an earlier assistant message not answered yet;
- every call of an assistant message must be answered before the next user or assistant turn
  (and before the conversation ends).

Each failure raises ParamError naming the message (`messages[i]...`). The deprecated
`function` role and `function_call` are left alone (they have no ids to pair).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from hearth.server.wire import ParamError


class _Call(Protocol):
    id: str | None


class _Message(Protocol):
    role: str
    tool_call_id: str | None

    @property
    def tool_calls(self) -> Sequence[_Call] | None: ...


def _unanswered(index: int, ids: list[str], anonymous: int) -> ParamError:
    named = ", ".join(ids) if ids else f"{anonymous} call(s) without an id"
    return ParamError(
        f"messages[{index}]",
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        f"to each 'tool_call_id'. These tool_call_ids have no response: {named}.",
    )


def check_tool_turns(messages: Sequence[_Message]) -> None:
    """ParamError (naming `messages[i]`) for the first tool turn that does not pair up."""
    caller: int | None = None  # the assistant message whose calls are awaited
    pending: list[str] = []  # its calls' ids not answered yet
    anonymous = 0  # its calls without an id: any tool message may answer one
    for i, message in enumerate(messages):
        if message.role == "tool":
            if message.tool_call_id is None:
                raise ParamError(
                    f"messages[{i}].tool_call_id",
                    "Missing parameter 'tool_call_id': messages with role 'tool' must have a "
                    "'tool_call_id'.",
                )
            if message.tool_call_id in pending:
                pending.remove(message.tool_call_id)
            elif anonymous:
                anonymous -= 1
            else:
                raise ParamError(
                    f"messages[{i}].tool_call_id",
                    f"Invalid 'tool_call_id' {message.tool_call_id!r}: messages with role "
                    "'tool' must be a response to a preceding message with 'tool_calls'.",
                )
            continue
        if message.role in ("user", "assistant") and caller is not None and (pending or anonymous):
            raise _unanswered(caller, pending, anonymous)
        if message.role == "assistant":
            calls = list(message.tool_calls or [])
            caller = i if calls else None
            pending = [c.id for c in calls if c.id is not None]
            anonymous = sum(c.id is None for c in calls)
    if caller is not None and (pending or anonymous):
        raise _unanswered(caller, pending, anonymous)

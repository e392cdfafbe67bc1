"""Tool calling: tool definitions and calls, call grammars, prompts for templates without tools.

The streaming parser that finds calls in model output is server.tool_parser.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from hearth.engine.types import JSON_STYLE, Grammar
from hearth.server.errors import APIError
from hearth.server.schema_refs import nest_schema, pointer

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
# The parameters of a function that takes none (`parameters` omitted): arguments are `{}`
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    """A function the model may call (chat's nested and responses' flat forms alike)."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    @classmethod
    def checked(
        cls, name: str, description: str | None, parameters: dict[str, Any] | None, param: str
    ) -> Tool:
        """A tool whose parameters schema is valid (400 naming `param` otherwise).

        Omitted (or empty) parameters mean, as in OpenAI's API, a function that takes none: its
        arguments are the empty object `{}`, never any JSON.
        """
        parameters = parameters or dict(NO_PARAMETERS)
        check_schema(parameters, param)
        return cls(name, description, parameters)

    def to_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def function_tools(tools: Sequence[Any] | None) -> list[Tool]:
    """Chat's `tools` (`{"type": "function", "function": {...}}` entries) as checked Tools; a bad
    schema is a 400 naming `tools[i].function.parameters`."""
    return [
        Tool.checked(t.function.name, t.function.description, t.function.parameters, param)
        for i, t in enumerate(tools or [])
        for param in [f"tools[{i}].function.parameters"]
    ]


@dataclass
class ToolCall:
    name: str
    arguments: str = ""  # JSON text as the model wrote it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def call_json(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    """A tool call as OpenAI's chat messages have it (responses, templates and history alike)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def check_schema(schema: dict[str, Any], param: str) -> None:
    """400 naming the field when `schema` is not a valid JSON Schema."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"Invalid schema for {param}: {exc.message}", param=param) from None


def json_grammar(schema: dict[str, Any] | None, param: str) -> Grammar:
    """Output must be JSON matching `schema` (any object when None: JSON mode)."""
    if schema is None:
        schema = {"type": "object"}
    check_schema(schema, param)
    return Grammar("json_schema", json.dumps(schema, sort_keys=False), param)


def format_grammar(
    kind: str, schema: dict[str, Any] | None, param: str, schema_param: str
) -> Grammar | None:
    """The grammar of a response format: none for text, any object for json_object, the schema
    for json_schema (`param` / `schema_param` name the request fields in errors)."""
    if kind == "json_object":
        return json_grammar(None, param)
    if kind == "json_schema":
        return json_grammar(schema, schema_param)
    return None


def call_grammar(tools: Sequence[Tool], parser: str, parallel: bool) -> Grammar:
    """Output must be a call (several if `parallel`) of one of `tools`, in the model's format."""
    key = "parameters" if parser == "llama3_json" else "arguments"
    rules = []
    for i, tool in enumerate(tools):
        arguments = nest_schema(tool.parameters, pointer("properties", key))  # $refs resolve
        call = {
            "type": "object",
            "properties": {"name": {"const": tool.name}, key: arguments},
            "required": ["name", key],
            "additionalProperties": False,
            "x-guidance": JSON_STYLE,
        }
        body = f"%json {json.dumps(call)}"
        if parser == "hermes":
            body = f'"{HERMES_OPEN}\\n" {body} "\\n{HERMES_CLOSE}"'
        rules.append(f"call_{i}: {body}")
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    start = 'start: call ("\\n" call)*' if parallel and parser == "hermes" else "start: call"
    return Grammar("lark", "\n".join([start, f"call: {alternatives}", *rules]), "tools")


def allowed(tools: list[Tool], names: Sequence[str], param: str) -> list[Tool]:
    """tool_choice `allowed_tools`: the tools named (in the order given), the only ones offered
    to the model and parsed; 400 naming `param`[i] for a name not among `tools`."""
    if not tools:
        return tools  # plan() says tool_choice needs tools
    by_name = {tool.name: tool for tool in tools}
    for i, name in enumerate(names):
        if name not in by_name:
            raise APIError(
                400, f"Allowed tool '{name}' is not one of the tools given.", param=f"{param}[{i}]"
            )
    return [by_name[name] for name in dict.fromkeys(names)]


def plan(
    tools: list[Tool],
    choice: str | None,
    named: str | None,
    parallel: bool | None,
    parser: str,
    output: Grammar | None,
) -> tuple[list[Tool], Grammar | None]:
    """The tools offered (their calls are parsed) and the grammar the output must follow.

    `choice` is none / auto / required, `named` a forced function's name; `output` is the
    response format's grammar, used unless a call is forced.
    """
    if (choice is not None or named is not None) and not tools:
        raise APIError(
            400, "'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice"
        )
    if choice == "none":
        return [], output
    if named is not None:
        forced = [tool for tool in tools if tool.name == named]
        if not forced:
            message = f"Tool choice '{named}' is not one of the tools given."
            raise APIError(400, message, param="tool_choice")
        return tools, call_grammar(forced, parser, parallel=False)
    if choice == "required":
        return tools, call_grammar(tools, parser, parallel is not False)
    return tools, output


# -- rendering ---------------------------------------------------------------------------------


def tool_prompt(tools: Sequence[Tool]) -> str:
    """How tools are described to a model whose chat template does not take them (Hermes style)."""
    signatures = "\n".join(json.dumps(tool.to_openai()) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{HERMES_OPEN}{HERMES_CLOSE} XML tags:\n"
        f'{HERMES_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
        f"{HERMES_CLOSE}"
    )


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def hermes_call(function: dict[str, Any]) -> str:
    call = {"name": function["name"], "arguments": _arguments(function["arguments"])}
    return f"{HERMES_OPEN}\n{json.dumps(call)}\n{HERMES_CLOSE}"


def prepare_messages(
    messages: list[dict[str, Any]], tools: Sequence[Tool], template_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and tools) for the chat template.

    A tool-aware template gets OpenAI tool definitions and calls with parsed arguments; for one
    without tools, the tools go into the system prompt and calls and results become text.
    """
    messages = copy.deepcopy(messages)  # the caller's (and a stored conversation's) stay as sent
    if template_tools:
        for message in messages:
            for call in message.get("tool_calls") or []:
                call["function"]["arguments"] = _arguments(call["function"]["arguments"])
        return messages, [tool.to_openai() for tool in tools] or None
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None) or []
        if calls:
            text = "\n".join(hermes_call(c["function"]) for c in calls)
            message["content"] = "\n".join(filter(None, [message.get("content"), text]))
        if message["role"] == "tool":
            message = {"role": "tool", "content": message["content"]}
        out.append(message)
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tool_prompt(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt(tools)})
    return out, None

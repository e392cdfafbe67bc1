"""Item 2 of issue 28: a user's JSON Schema nested inside a grammar keeps its references
resolvable (server/schema_refs.py), in every place that nests one: forced, named and allowed
tools, chat and Responses. llguidance compiles each grammar, as the engine would."""

from __future__ import annotations

from typing import Any

import llguidance
import openai
import pydantic
import pytest

from hearth.server.schema_refs import nest_schema, pointer
from hearth.server.tools import Tool, call_grammar, json_grammar
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import create
from tests.unit.test_responses import make_client as make_responses_client
from tests.unit.test_server import chat


class Step(pydantic.BaseModel):
    action: str
    children: list[Step] = []  # recursive through $defs


class Where(pydantic.BaseModel):
    city: str


class Plan(pydantic.BaseModel):
    steps: list[Step]
    where: Where  # a second definition


PLAN = openai.pydantic_function_tool(Plan)["function"]["parameters"]

# the shapes of the kind tried: each nests references a different way
SHAPES: dict[str, dict[str, Any]] = {
    "pydantic nested models ($defs, recursive)": PLAN,
    "draft-07 definitions": {
        "type": "object",
        "definitions": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}}},
        "properties": {"items": {"type": "array", "items": {"$ref": "#/definitions/Item"}}},
    },
    "root recursion ($ref: #)": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "child": {"$ref": "#"}},
        "required": ["name"],
    },
    "a pointer into properties": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"$ref": "#/properties/a"}},
    },
    "$defs inside a $def": {
        "type": "object",
        "$defs": {
            "Outer": {
                "type": "object",
                "$defs": {"Inner": {"type": "integer"}},
                "properties": {"x": {"$ref": "#/$defs/Outer/$defs/Inner"}},
            }
        },
        "properties": {"outer": {"$ref": "#/$defs/Outer"}},
    },
}


def compile_error(spec: str) -> str:
    """llguidance's message for a lark grammar that does not compile ("" when it does)."""
    return llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(spec))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_call_grammars_compile_with_references(shape: str, parser: str) -> None:
    tools = [Tool.checked("plan", None, SHAPES[shape], "p"), Tool.checked("other", None, None, "q")]
    for parallel in (False, True):
        assert compile_error(call_grammar(tools, parser, parallel).spec) == ""


def test_the_unnested_schema_is_what_failed() -> None:
    """The bug itself: the schema pasted in as it is does not compile."""
    import json

    call = {"type": "object", "properties": {"arguments": PLAN}}
    assert "does not exist" in compile_error(f"start: %json {json.dumps(call)}")


def test_nest_schema_rewrites_local_pointers_only() -> None:
    schema = {
        "$ref": "#/$defs/A",
        "properties": {
            "anchor": {"$ref": "#here"},
            "remote": {"$ref": "https://example.com/s.json#/x"},
            "data": {"const": {"$ref": "#/not/a/schema"}},
        },
    }
    nested = nest_schema(schema, pointer("properties", "a/b"))
    assert nested["$ref"] == "#/properties/a~1b/$defs/A"
    assert nested["properties"]["anchor"] == {"$ref": "#here"}
    assert nested["properties"]["remote"]["$ref"] == "https://example.com/s.json#/x"
    assert nested["properties"]["data"] == {"const": {"$ref": "#/not/a/schema"}}
    assert schema["$ref"] == "#/$defs/A"  # the caller's schema is left as sent


@pytest.mark.parametrize("shape", list(SHAPES))
def test_response_format_schemas_with_references(shape: str) -> None:
    """response_format / text.format sit at the grammar's root: their references hold as sent."""
    grammar = json_grammar(SHAPES[shape], "response_format.json_schema.schema")
    compiled = llguidance.LLMatcher.grammar_from_json_schema(grammar.spec)
    assert llguidance.LLMatcher.validate_grammar(compiled) == ""


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "Plan"}}])
def test_chat_forced_tools_with_refs_reach_the_engine(choice: Any) -> None:
    client, engine = make_responses_client(FakeEngine(max_model_len=4096))  # any route
    tool = openai.pydantic_function_tool(Plan)
    reply = chat(client, tools=[tool], tool_choice=choice)
    assert reply.status_code == 200, reply.text
    assert compile_error(engine.requests[-1].sampling.grammar.spec) == ""


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "Plan"}])
def test_responses_forced_tools_with_refs_reach_the_engine(choice: Any) -> None:
    client, engine = make_responses_client(FakeEngine(max_model_len=4096))
    function = openai.pydantic_function_tool(Plan)["function"]
    reply = create(
        client, input="plan", tools=[{"type": "function", **function}], tool_choice=choice
    )
    assert reply.status_code == 200, reply.text
    assert compile_error(engine.requests[-1].sampling.grammar.spec) == ""

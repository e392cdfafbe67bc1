"""Tool calling and structured outputs: parser, rendering, validation, the default model live."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from hearth.server.tools import prepare_messages
from tests.fixtures.server import running_server
from tests.unit.test_tools import CHAT_TOOLS, SCHEMAS, TOOLS, WEATHER, weather_call_turns


@pytest.fixture(scope="module")
def sdk() -> Any:
    with running_server(timeout=300) as (base_url, _):
        yield openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)


# Live requests that sample say how: a fixed temperature and, where the API has one, a seed, so
# a run repeats on one machine. Their assertions hold for any sample: another CPU's floats give
# other samples, and grammar-constrained ones always complete within their budget (the closing
# plan, engine/constrained/closing.py; every budget below exceeds its grammar's plan several
# times over).
SAMPLED = {"temperature": 0.7, "seed": 20}


def ask_weather(sdk: Any, **extra: Any) -> Any:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    return sdk.chat.completions.create(
        model="default",
        messages=messages,
        tools=CHAT_TOOLS,
        max_tokens=120,
        **{**SAMPLED, **extra},
    )


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_live_forced_tool_calls_are_schema_valid(sdk: Any, choice: Any) -> None:
    result = ask_weather(sdk, tool_choice=choice)
    assert result.choices[0].finish_reason == "tool_calls"
    for call in result.choices[0].message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    streamed: dict[int, dict[str, str]] = {}
    for chunk in ask_weather(sdk, tool_choice=choice, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = streamed.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert streamed and all(c["id"].startswith("call_") for c in streamed.values())
    for call in streamed.values():
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_live_json_schema_outputs_validate(sdk: Any, name: str) -> None:
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    for stream in (False, True):
        kwargs = dict(
            model="default",
            max_tokens=150,
            response_format=fmt,
            stream=stream,
            messages=[{"role": "user", "content": f"Make up a {name} as JSON."}],
            **SAMPLED,
        )
        if stream:
            text = "".join(
                c.choices[0].delta.content or "" for c in sdk.chat.completions.create(**kwargs)
            )
        else:
            text = sdk.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_live_json_mode_and_responses_text_format(sdk: Any) -> None:
    reply = sdk.chat.completions.create(
        model="default",
        max_tokens=100,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        **SAMPLED,
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = SCHEMAS["person"]
    response = sdk.responses.create(
        model="default",
        input="A person as JSON.",
        max_output_tokens=150,
        temperature=SAMPLED["temperature"],  # the Responses API has no seed
        text={
            "format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
        },
    )
    jsonschema.validate(json.loads(response.output_text), schema)


def test_live_chat_tool_round_trip(sdk: Any) -> None:
    first = ask_weather(sdk, tool_choice="required", parallel_tool_calls=False)
    message = first.choices[0].message
    [call] = message.tool_calls
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_celsius": 18}'},
    ]
    second = sdk.chat.completions.create(
        model="default", messages=messages, tools=CHAT_TOOLS, max_tokens=40, temperature=0
    )
    # With tools offered the model may answer or call again: either is a reply to the result.
    reply = second.choices[0].message
    assert reply.content or reply.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_live_responses_tool_round_trip(sdk: Any) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    first = sdk.responses.create(
        model="default",
        input="What is the weather in Paris?",
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=120,
        temperature=SAMPLED["temperature"],
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 18}'}
    second = sdk.responses.create(
        model="default",
        previous_response_id=first.id,
        input=[result],
        tools=tools,
        max_output_tokens=40,
        temperature=0,
    )
    # With tools offered the model may answer or call again: either is a reply to the result.
    assert second.status == "completed"
    assert second.output_text or any(item.type == "function_call" for item in second.output)
    assert second.usage.input_tokens > first.usage.input_tokens
    with sdk.responses.stream(
        model="default",
        input="Weather in Oslo?",
        tools=tools,
        tool_choice="required",
        max_output_tokens=120,
        temperature=SAMPLED["temperature"],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    for item in final.output:
        assert item.type == "function_call"
        jsonschema.validate(json.loads(item.arguments), WEATHER)


def test_tool_aware_templates_render_tools_and_pick_the_parser(smollm_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    from hearth.engine.text.tokenizer import ChatTokenizer

    hf = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    plain = ChatTokenizer(hf)
    assert not plain.template_tools and plain.tool_parser() == "hermes"
    hf.chat_template = (
        "{% if tools %}<|python_tag|>{% for t in tools %}{{ t.function.name }};{% endfor %}"
        "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}{% endfor %}"
    )
    llama = ChatTokenizer(hf)
    assert llama.template_tools and llama.tool_parser() == "llama3_json"
    assert llama.tool_parser("hermes") == "hermes"  # models.yaml wins
    history = weather_call_turns("Lima", "c")
    messages, tools = prepare_messages(history, TOOLS[:1], template_tools=True)
    text = hf.decode(llama.encode_chat(messages, tools))
    assert "get_weather;" in text and "Lima" in text  # tools and parsed arguments reached it


def test_live_streamed_logprobs_with_tools_cover_every_token(sdk: Any) -> None:
    stream = ask_weather(
        sdk,
        tool_choice="required",
        stream=True,
        logprobs=True,
        stream_options={"include_usage": True},
    )
    entries, completion_tokens = 0, None
    for chunk in stream:
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            entries += len(choice.logprobs.content or []) if choice.logprobs else 0
    # every token of the text is listed; the stop token that ended the call is not
    assert completion_tokens and entries == completion_tokens - 1

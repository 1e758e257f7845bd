"""Structured output and tool calls through the gateway (issue 30), with the official openai client on
the real network: response_format json_schema answers JSON that parses and holds to the schema; named
and required tool calls, streamed and not, come back as OpenAI tool calls whose arguments parse (streamed:
one chunk names the function, the argument fragments join into JSON)."""

from __future__ import annotations

import json

import pytest

from tests.support.tools import WEATHER_TOOL

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["color", "n"],
    "additionalProperties": False,
}
TOOLS = [WEATHER_TOOL]
MESSAGES = [{"role": "user", "content": "What is the weather?"}]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_json_schema_answer_parses_and_holds_to_the_schema(client, seed):
    done = client.chat.completions.create(
        model="default",
        messages=MESSAGES,
        max_tokens=64,
        seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}},
    )
    answer = json.loads(done.choices[0].message.content)
    assert set(answer) == {"color", "n"} and answer["color"] in ("red", "green") and 0 <= answer["n"] <= 9


@pytest.mark.parametrize(
    "tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"]
)
def test_named_and_required_tool_calls(client, tool_choice):
    done = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=64, tools=TOOLS, tool_choice=tool_choice
    )
    (call,) = done.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    assert done.usage.completion_tokens > 0  # metered like any answer


@pytest.mark.parametrize(
    "tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"]
)
def test_streamed_tool_calls_name_the_function_once_and_their_fragments_join_into_json(client, tool_choice):
    stream = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=64, tools=TOOLS, tool_choice=tool_choice, stream=True
    )
    deltas = [d for chunk in stream if chunk.choices for d in chunk.choices[0].delta.tool_calls or ()]
    assert deltas and {d.index for d in deltas} == {0}
    named = [d for d in deltas if d.function and d.function.name]
    assert [d.function.name for d in named] == ["get_weather"] and named[0] is deltas[0] and deltas[0].id
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments)["city"] in ("Paris", "Rome")


def test_a_tool_result_sent_back_is_answered_and_counted_as_the_node_counts(network, client):
    """An agent loop: the tool call goes back as the assistant's turn with the tool's result after it.
    The default model's template renders both (a 400 before), and the gateway's own count of that
    prompt equals the node's (vLLM turns the call's JSON arguments into a dict for the template; the
    gateway does the same), so no prompt disagreement is counted."""
    from tests.support.metrics import sample_sum

    first = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=64, tools=TOOLS, tool_choice="required"
    )
    (call,) = first.choices[0].message.tool_calls
    messages = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    metrics = f"{network.base_url}/metrics"
    before = sample_sum(metrics, "meritnet_usage_disagreements", field="prompt")
    done = client.chat.completions.create(model="default", messages=messages, max_tokens=16, tools=TOOLS)
    assert done.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert done.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in it
    assert sample_sum(metrics, "meritnet_usage_disagreements", field="prompt") == before

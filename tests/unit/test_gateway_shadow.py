"""Shadow capture at the gateway (fake nodes, no Ray): every node request asks for token ids, clients
that did not ask get nulls (as from stock vLLM), and a sample of verifiable organic requests is
offered to validators with exactly what the client received."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from cluster.metering import MemoryUsageSink
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.selection import load_selector
from routing.shadow import strip_token_ids, verifiable
from tests.support.gateway_fakes import FakeNode, FakeShadowFeed, actor_handle, node_stats


def _gateway(**cfg):
    nodes = {"a": FakeNode("a"), "e": FakeNode("e")}
    sink = MemoryUsageSink()

    core = GatewayCore(
        GatewayConfig(**cfg),
        load_selector(registry=None),
        nodes.__getitem__,
        actor_handle(sink),
        registry=None,
    )
    core.set_nodes([node_stats("a"), node_stats("e", model_id="emb", task="embed")])
    feed = FakeShadowFeed()
    core.refresher.shadow_feed = feed
    return TestClient(build_fastapi(lambda: core)), nodes["a"], feed


def test_every_node_request_asks_for_token_ids_and_unasking_clients_get_nulls():
    client, node, _ = _gateway()
    plain = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2}).json()
    asked = client.post(
        "/v1/completions",
        json={"model": "default", "prompt": "hi", "max_tokens": 2, "return_token_ids": True},
    ).json()
    assert all(b.return_token_ids for b in node.bodies)  # the node cannot tell the two apart
    assert plain["choices"][0]["token_ids"] is None and asked["choices"][0]["token_ids"] == [7, 8]
    body = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True}).text
    chunks = [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: {")]
    assert chunks and all(c["choices"][0]["token_ids"] is None for c in chunks)
    body = client.post(
        "/v1/completions", json={"model": "default", "prompt": "hi", "stream": True, "return_token_ids": True}
    ).text
    ids = [
        i
        for e in body.split("\n\n")
        if e.startswith("data: {")
        for i in json.loads(e[6:])["choices"][0]["token_ids"]
    ]
    assert ids == [7, 8]


def test_token_id_capture_can_be_turned_off():
    client, node, _ = _gateway(capture_token_ids=False)
    client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
    assert not node.bodies[-1].return_token_ids


@pytest.mark.parametrize("stream", [False, True])
def test_sampled_organic_requests_are_offered_with_what_the_client_got(stream):
    client, _, feed = _gateway(shadow_rate=1.0)
    r = client.post(
        "/v1/completions",
        json={"model": "default", "prompt": "tell me", "max_tokens": 2, "temperature": 0, "stream": stream},
    )
    assert r.status_code == 200
    (item,) = feed.items
    assert item.request_id == r.headers["x-meritnet-request-id"] and item.node_id == "a"
    assert (item.prompt, item.messages, item.max_tokens, item.temperature) == ("tell me", None, 2, 0.0)
    assert (item.text, item.token_ids, item.completion_tokens, item.finish_reason) == (
        "hello world" if not stream else "hello",
        (7, 8),
        2,
        "length",
    )


def test_challenges_and_unverifiable_requests_are_not_offered():
    client, _, feed = _gateway(shadow_rate=1.0, challenge_keys=(SecretStr("ck"),))
    pinned = {"x-meritnet-node": "a", "x-meritnet-challenge-key": "ck"}
    assert (
        client.post("/v1/completions", json={"model": "default", "prompt": "x"}, headers=pinned).status_code
        == 200
    )
    for extra in (
        {"presence_penalty": 0.5},
        {"n": 2},
        {"logit_bias": {"5": 10}},
        {"echo": True},
        {"prompt": ["a", "b"]},
    ):
        assert (
            client.post("/v1/completions", json={"model": "default", "prompt": "x", **extra}).status_code
            == 200
        )
    assert feed.items == []
    client.post("/v1/completions", json={"model": "default", "prompt": "x"})
    assert len(feed.items) == 1


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_sampled_embeddings_are_offered_with_the_vectors_the_client_got(encoding):
    import base64

    import numpy as np

    client, _, feed = _gateway(shadow_rate=1.0)
    r = client.post(
        "/v1/embeddings", json={"model": "emb", "input": ["ab", "c"], "encoding_format": encoding}
    )
    assert r.status_code == 200, r.text
    (item,) = feed.items
    assert (item.request_id, item.node_id, item.model) == (r.headers["x-meritnet-request-id"], "e", "emb")
    got = [d["embedding"] for d in r.json()["data"]]
    if encoding == "base64":
        got = [np.frombuffer(base64.b64decode(v), dtype="<f4").tolist() for v in got]
    assert item.inputs == ("ab", "c") and [list(v) for v in item.vectors] == got


def test_embeddings_a_validator_cannot_recompute_exactly_are_not_offered():
    client, _, feed = _gateway(shadow_rate=1.0)
    for extra in (
        {"dimensions": 2},
        {"input": [[1, 2, 3]]},
        {"input": ["x"] * 17},
        {"truncate_prompt_tokens": 2},
    ):
        body = {"model": "emb", "input": "x", **extra}
        assert client.post("/v1/embeddings", json=body).status_code == 200, extra
    assert feed.items == []
    assert client.post("/v1/embeddings", json={"model": "emb", "input": ["x"] * 16}).status_code == 200
    assert len(feed.items) == 1


def test_shadow_rate_zero_offers_nothing():
    client, _, feed = _gateway(shadow_rate=0.0)
    for _ in range(5):
        client.post("/v1/completions", json={"model": "default", "prompt": "x"})
    assert feed.items == []


def test_verifiable_is_a_whitelist_of_plain_requests():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["\n"],
            "seed": 3,
        }
    )
    assert verifiable(chat)
    parts = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    )
    tools = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "none",
        }
    )
    assert not verifiable(parts) and not verifiable(tools)
    assert not verifiable(
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "frequency_penalty": 1.0})
    )
    assert not verifiable(CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 1.5}))
    assert verifiable(CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 1.0}))


def _chat(**fields):
    """A validated chat request saying "hi", with `fields` added."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_structured_answers_are_verifiable_when_their_schema_is_short():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}
    named = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    assert verifiable(_chat(response_format={"type": "json_object"}))
    assert verifiable(_chat(response_format=named)) and verifiable(_chat(response_format={"type": "text"}))
    long = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}
    assert not verifiable(
        _chat(response_format={"type": "json_schema", "json_schema": {"name": "l", "schema": long}})
    )
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}
    assert not verifiable(_chat(response_format=tag))


def test_a_structured_answer_is_offered_with_the_schema_vllm_compiled():
    client, _, feed = _gateway(shadow_rate=1.0)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    ):
        r = client.post(
            "/v1/completions",
            json={
                "model": "default",
                "prompt": "x",
                "max_tokens": 2,
                "response_format": response_format,
            },
        )
        assert r.status_code == 200
    assert [i.json_schema for i in feed.items] == ['{"type": "object"}', json.dumps(schema)]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("tool_choice", "offered"),
    [
        ("required", True),
        ({"type": "function", "function": {"name": "get_weather"}}, True),
        ("auto", True),  # the validator runs the nodes' tool parser over the text
        ("none", False),  # whether the template renders the tools then depends on the server
    ],
)
def test_requests_with_tools_are_verifiable_by_their_tool_choice(tool_choice, offered):
    body = _chat(tools=[WEATHER], tool_choice=tool_choice)
    assert verifiable(body) is offered
    if tool_choice == "auto":  # streamed, vLLM parses the text incrementally: not replayed
        assert not verifiable(_chat(tools=[WEATHER], tool_choice=tool_choice, stream=True))


def test_a_tool_call_is_captured_with_the_schema_vllm_builds_and_the_calls_the_client_got():
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    from cluster.completions import parse_body
    from routing.metering import Tally
    from routing.shadow import Capture

    body = _chat(tools=[WEATHER], tool_choice="required")
    tally = Tally()
    deltas = [  # streamed as vLLM streams a required call: the name once, the arguments in pieces
        {"index": 0, "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Rome"}'}},
    ]
    for delta in deltas:
        tally.add(parse_body({"choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "token_ids": [5]}]}))
    tally.add(parse_body({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    item = Capture("r1", body).served("a", tally, completion_tokens=3)
    assert item.tool_use.calls == (("get_weather", '{"city": "Rome"}'),) and item.tool_use.mode == "required"
    assert item.json_schema == json.dumps(get_json_schema_from_tools("required", body.tools))
    assert item.finish_reason == "stop"  # a required call's natural end, as the ids show it
    assert item.tool_use.tools[0]["function"]["name"] == "get_weather"


def test_strip_token_ids_leaves_text_that_looks_like_ids_alone():
    piece = (
        'data: {"choices":[{"text":"\\"token_ids\\":[1,2]","token_ids":[3,4]}],'
        '"prompt_token_ids":[1,2,3]}\n\n'
    )
    out = strip_token_ids(piece)
    data = json.loads(out[6:])
    assert data["choices"][0]["text"] == '"token_ids":[1,2]' and data["choices"][0]["token_ids"] is None
    assert data["prompt_token_ids"] is None
    assert strip_token_ids("data: [DONE]\n\n") == "data: [DONE]\n\n"


def test_an_absent_named_actor_is_not_looked_up_on_every_refresh(monkeypatch):
    import asyncio

    import ray

    calls = []

    def get_actor(name, namespace=None):
        calls.append(name)
        raise ValueError(f"no actor {name}")

    monkeypatch.setattr(ray, "get_actor", get_actor)
    core = GatewayCore(GatewayConfig(), load_selector(registry=None), {}.__getitem__, None, registry=None)

    async def lookups():
        return [await core.refresher.named_actor("meritnet-consensus") for _ in range(5)]

    assert asyncio.run(lookups()) == [None] * 5 and calls == ["meritnet-consensus"]
    core.refresher._absent_until["meritnet-consensus"] = 0.0  # the retry interval has passed
    asyncio.run(core.refresher.named_actor("meritnet-consensus"))
    assert len(calls) == 2


def test_a_tool_call_with_long_tool_definitions_is_not_offered():

    long = {**WEATHER, "function": {**WEATHER["function"], "description": "x" * 10_000}}
    body = _chat(tools=[long], tool_choice="required")
    assert not verifiable(body)  # the schema is short, but the validator would render all of it


def test_tool_calls_are_offered_only_as_the_nodes_parser_can_be_replayed():
    from cluster.structured import replayed_parser

    required, auto = _chat(tools=[WEATHER], tool_choice="required"), _chat(tools=[WEATHER])
    assert verifiable(required, "pythonic") and verifiable(auto, "pythonic")  # the network's default
    assert not verifiable(required, "hermes") and verifiable(
        auto, "hermes"
    )  # named/required: a structural tag
    assert not verifiable(required, None) and not verifiable(auto, None)
    assert replayed_parser([{"tool_call_parser": "pythonic"}] * 2) == "pythonic"
    assert replayed_parser([{"tool_call_parser": "pythonic"}, {"tool_call_parser": "hermes"}]) is None
    assert replayed_parser([{"tool_call_parser": "pythonic", "reasoning_parser": "qwen3"}]) is None

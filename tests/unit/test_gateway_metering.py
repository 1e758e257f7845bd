"""Metering trusts no node (issue 10): the gateway bills its own count of what it forwarded; a node's
usage report, however inflated, is only compared. Fake nodes and a fake tokenizer (no Ray, no vLLM);
the real tokenizer and real lying nodes run in the integration tests."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from cluster.metering import MemoryUsageSink
from routing import metrics
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.metering import TokenCounter, limits
from routing.selection import load_selector
from tests.support.gateway_fakes import (
    CharTokenizer,
    ErrorNode,
    FakeStream,
    LyingNode,
    actor_handle,
    node_stats,
)


def _gateway(node, counter=True, honest=None):
    nodes = {"liar": node, **({"honest": honest} if honest else {})}
    sink = MemoryUsageSink()

    counters = {"default": TokenCounter(CharTokenizer(), max_model_len=1024)} if counter else {}
    core = GatewayCore(
        GatewayConfig(),
        load_selector(registry=None),
        nodes.__getitem__,
        actor_handle(sink),
        registry=None,
        counters=counters,
    )
    core.set_nodes([node_stats(n) for n in nodes])
    return TestClient(build_fastapi(lambda: core)), sink


def _records(sink):
    return asyncio.run(sink.all())


@pytest.mark.parametrize("stream", [False, True])
def test_inflated_usage_is_not_billed_and_the_client_sees_the_gateways_count(stream):
    client, sink = _gateway(LyingNode("liar"))
    before = metrics.USAGE_DISAGREEMENTS.labels("liar", "completion")._value.get()
    body = {
        "model": "default",
        "prompt": "hi there",
        "max_tokens": 8,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    r = client.post("/v1/completions", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 200
    usage = (
        r.json()
        if not stream
        else next(json.loads(e[6:]) for e in r.text.split("\n\n") if '"choices":[]' in e)
    )
    (rec,) = _records(sink)
    # prompt: BOS + 8 characters by the model's tokenizer; completion: the 5 ids that decode to "hello"
    assert (rec.prompt_tokens, rec.completion_tokens) == (9, 5)
    assert usage["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    assert metrics.USAGE_DISAGREEMENTS.labels("liar", "completion")._value.get() == before + 1


def test_ids_that_do_not_decode_to_the_text_are_billed_as_the_text():
    client, sink = _gateway(LyingNode("liar", usage=(9, 50), ids=[ord("x")] * 50))
    client.post("/v1/completions", json={"model": "default", "prompt": "hi there", "max_tokens": 64})
    assert _records(sink)[0].completion_tokens == 5  # "hello", not the 50 ids it made up


def test_without_a_tokenizer_counts_are_still_bounded_by_the_request():
    client, sink = _gateway(LyingNode("liar", ids=list(range(2, 10))), counter=False)
    client.post("/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 8})
    (rec,) = _records(sink)
    assert rec.completion_tokens == 7  # 8 ids for "hello": at most its 5 bytes + 2 of slack
    assert rec.prompt_tokens <= 64 + 2  # 10^6 reported, bounded by the prompt's bytes + template allowance


def test_more_ids_than_max_tokens_is_a_malformed_answer():
    client, sink = _gateway(LyingNode("liar", ids=list(range(2, 40))), honest=LyingNode("honest"))
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 8})
    assert r.status_code == 200 and r.headers["x-meritnet-node"] == "honest"
    assert {rec.node_id for rec in _records(sink)} == {"honest"}  # 38 ids: never billed


@pytest.mark.parametrize(
    "chunks",
    [
        ['data: {"choices":[{"index":0,"text":"he","token_ids":[104,-1]}]}\n\n'],  # negative id
        ['data: {"choices":[{"index":0,"text":5,"token_ids":[104]}]}\n\n'],  # text not a string
        ["data: {not json\n\n"],
        ["event: surprise\n\n"],
        ['data: {"choices":[{"index":0,"text":"h","token_ids":[104]}],"usage":{"prompt_tokens":1e30}}\n\n'],
    ],
)
def test_malformed_stream_ends_in_a_clean_error_and_bills_nothing_ok(chunks):
    client, sink = _gateway(
        LyingNode("liar", chunks=['data: {"choices":[{"index":0,"text":"x"}]}\n\n', *chunks])
    )
    before = metrics.MALFORMED.labels("liar")._value.get()
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"
    assert "[DONE]" not in r.text and "surprise" not in r.text and "not json" not in r.text
    (rec,) = _records(sink)
    assert rec.status == "error"
    assert metrics.MALFORMED.labels("liar")._value.get() == before + 1


def test_a_malformed_non_streamed_answer_is_retried_on_another_node():
    bad = LyingNode("liar", chunks=["not a response object"])  # a node answering with a bare string
    honest = LyingNode("honest", usage=(9, 5))
    client, sink = _gateway(bad, honest=honest)
    for _ in range(3):
        r = client.post("/v1/completions", json={"model": "default", "prompt": "hi there"})
        assert r.status_code == 200 and r.headers["x-meritnet-node"] == "honest"
    assert {rec.node_id for rec in _records(sink)} == {"honest"}


def test_chat_prompts_are_counted_with_the_chat_template():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    counter = TokenCounter(CharTokenizer(), max_model_len=1024)
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hey"}])
    assert counter.prompt_tokens(body) == len("<user>hey<assistant>")


def test_limits_scale_with_n_and_prompts():
    from ray.serve.llm.openai_api_models import CompletionRequest

    body = CompletionRequest(model="m", prompt=["a", "b", "c"], max_tokens=10, n=2)
    prompt_cap, completion_cap = limits(body, max_model_len=100)
    assert completion_cap == 60 and prompt_cap <= 3 * 100


def test_an_engine_4xx_reaches_the_client_and_a_5xx_moves_the_request():
    client, _ = _gateway(ErrorNode("liar", 400))
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("engine says no")
    client, _sink = _gateway(ErrorNode("liar", 500), honest=LyingNode("honest", usage=(9, 5)))
    for _ in range(3):
        r = client.post("/v1/completions", json={"model": "default", "prompt": "hi there"})
        assert r.status_code == 200 and r.headers["x-meritnet-node"] == "honest"


def test_a_node_that_sends_an_object_instead_of_text_is_not_trusted():
    """The gateway never calls methods on what a node sends: an object (here a response object that
    would run code in `model_dump_json`) is malformed output, and the request moves on."""

    class Trojan:
        def model_dump_json(self):
            raise AssertionError("the gateway ran a node's code")

    bad = LyingNode("liar", chunks=[])
    bad._respond = lambda body, kind: FakeStream([Trojan()])
    client, _sink = _gateway(bad, honest=LyingNode("honest", usage=(9, 5)))
    for _ in range(3):
        r = client.post("/v1/completions", json={"model": "default", "prompt": "hi there"})
        assert r.status_code == 200 and r.headers["x-meritnet-node"] == "honest"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_arguments_are_billed_like_any_generated_text(stream):
    """A tool call's name and arguments are text the model generated and the client got: without them a
    tool call billed 0 completion tokens (found on the demo) and tool calls were free generation."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from cluster.completions import parse_body
    from routing.metering import Tally, metered

    counter = TokenCounter(CharTokenizer(), max_model_len=1024)
    body = ChatCompletionRequest(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=64)
    tally = Tally.for_request(body, counter)
    call = {"index": 0, "id": "call-1", "type": "function", "function": {"name": "get_weather"}}
    # what the engine generated (its ids, returned to the gateway); the client gets it re-shaped
    generated = [ord(c) for c in '[{"name": "get_weather", "parameters": {"city": "Paris"}}]']
    if stream:  # the name first, then the arguments in fragments
        deltas = [{"tool_calls": [call]}] + [
            {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
            for part in ('{"city": ', '"Paris"}')
        ]
        for delta, ids in zip(deltas, (generated[:20], generated[20:40], generated[40:]), strict=True):
            tally.add(parse_body({"choices": [{"index": 0, "delta": delta, "token_ids": ids}]}))
    else:
        whole = {**call, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        message = {"content": "", "tool_calls": [whole]}
        tally.add(parse_body({"choices": [{"index": 0, "message": message, "token_ids": generated}]}))
    _, completion, _ = metered(body, tally, counter)
    # the ids do not decode to what the client got: billed as that text (one token per character here)
    assert completion == len('get_weather{"city": "Paris"}')


def test_tool_call_arguments_reach_the_template_as_vllm_hands_them_over():
    """vLLM parses an assistant's tool call arguments into a dict before the chat template renders them;
    the gateway's count must see the same, and arguments that are not JSON must not raise here."""
    from routing.metering import message_dict

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
    out = message_dict({"role": "assistant", "content": None, "tool_calls": [call]})
    assert out["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert call["function"]["arguments"] == '{"city": "Paris"}'  # the request itself is not changed
    bad = {**call, "function": {"name": "f", "arguments": "{not json"}}
    kept = message_dict({"role": "assistant", "tool_calls": [bad]})
    assert kept["tool_calls"][0]["function"]["arguments"] == "{not json"
    tool = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert message_dict(tool) is tool

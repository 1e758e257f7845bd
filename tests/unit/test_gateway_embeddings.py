"""/v1/embeddings through the gateway (issue 30), with fake nodes: routing by task, the gateway's own
count of the inputs' tokens, strict checks of a node's vectors, OpenAI-shaped refusals. The real engines
answer the same requests in tests/integration/network/test_embeddings.py."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from fastapi.testclient import TestClient

from cluster.metering import MemoryUsageSink
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.metering import TokenCounter
from routing.selection import load_selector
from tests.support.gateway_fakes import CharTokenizer, FakeNode, actor_handle, node_stats

EMBED = "emb"


class LyingEmbedder(FakeNode):
    """Answers embeddings with `answer(body)`: a node that returns what it likes."""

    def __init__(self, node_id, answer):
        super().__init__(node_id)
        self._answer = answer

    def embedding_answer(self, body) -> str:
        return self._answer(body)


def _gateway(nodes: dict) -> TestClient:
    """A gateway over a chat node 'a' (model default) and the embeddings nodes in `nodes` (model emb),
    counting tokens one per character (+1 special token per input)."""
    sink = MemoryUsageSink()
    counters = {m: TokenCounter(CharTokenizer(), 64) for m in ("default", EMBED)}
    everything = {"a": FakeNode("a"), **nodes}
    core = GatewayCore(
        GatewayConfig(),
        load_selector(registry=None),
        everything.__getitem__,
        actor_handle(sink),
        counters=counters,
    )
    core.set_nodes([node_stats("a")] + [node_stats(n, model_id=EMBED, task="embed") for n in nodes])
    client = TestClient(build_fastapi(lambda: core))
    client.sink, client.nodes = sink, everything
    return client


def test_a_batch_is_answered_in_order_and_billed_by_the_gateways_own_count():
    gw = _gateway({"e1": FakeNode("e1")})
    r = gw.post("/v1/embeddings", json={"model": EMBED, "input": ["ab", "cde", "f"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["embedding"][0] for d in body["data"]] == [1.0, 2.0, 3.0]
    # 2+1, 3+1, 1+1 (CharTokenizer adds one special token per input), never the node's claim of 9
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    (record,) = gw.sink._records.values()
    assert (record.model, record.node_id, record.prompt_tokens, record.completion_tokens) == (
        EMBED,
        "e1",
        9,
        0,
    )
    assert record.request_id == r.headers["x-meritnet-request-id"]


def test_token_inputs_truncation_and_base64():
    gw = _gateway({"e1": FakeNode("e1")})
    r = gw.post(
        "/v1/embeddings",
        json={"model": EMBED, "input": [[5, 6, 7], [8]], "encoding_format": "base64"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 4
    vector = struct.unpack("<4f", base64.b64decode(r.json()["data"][1]["embedding"]))
    assert vector == (2.0, 0.0, 0.0, 0.0)
    r = gw.post("/v1/embeddings", json={"model": EMBED, "input": "abcdefgh", "truncate_prompt_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 3  # what the engine embeds, not the whole text


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": ["a"] * 2049}, "input"),
        ({"input": "a", "encoding_format": "bytes"}, "encoding_format"),
        ({"input": "a", "embed_dtype": "float16"}, "encoding_format"),
        ({"input": "a", "endianness": "big"}, "endianness"),
        ({}, "input"),
    ],
)
def test_bad_requests_are_openai_shaped_400s_and_reach_no_node(payload, param):
    gw = _gateway({"e1": FakeNode("e1")})
    r = gw.post("/v1/embeddings", json={"model": EMBED, **payload})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"] == param
    assert gw.nodes["e1"].calls == 0


def test_each_model_serves_only_its_own_task():
    gw = _gateway({"e1": FakeNode("e1")})
    r = gw.post("/v1/embeddings", json={"model": "default", "input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    r = gw.post(
        "/v1/chat/completions", json={"model": EMBED, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    assert gw.nodes["a"].calls == 0 and gw.nodes["e1"].calls == 0
    models = {m["id"]: m for m in gw.get("/v1/models").json()["data"]}
    assert models[EMBED]["capabilities"] == ["embeddings"]
    assert "embeddings" not in models["default"]["capabilities"]
    assert {"chat", "completions"} <= set(models["default"]["capabilities"])


def _answer(data, usage=None) -> str:
    return json.dumps({"object": "list", "data": data, "usage": usage or {"prompt_tokens": 1}})


LIES = {
    "one vector short": lambda body: _answer([{"index": 0, "embedding": [1.0]}]),
    "an index twice": lambda body: _answer(
        [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]
    ),
    "ragged vectors": lambda body: _answer(
        [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]
    ),
    "NaN in JSON": lambda body: '{"data":[{"index":0,"embedding":[NaN]},{"index":1,"embedding":[1.0]}]}',
    "strings for floats": lambda body: _answer(
        [{"index": 0, "embedding": ["1.0"]}, {"index": 1, "embedding": ["2.0"]}]
    ),
    "base64 where floats were asked": lambda body: _answer(
        [{"index": i, "embedding": base64.b64encode(b"\0" * 4).decode()} for i in range(2)]
    ),
    "not JSON": lambda body: "vectors!",
    "a chat answer": lambda body: '{"choices":[{"index":0,"text":"hi"}]}',
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_node_that_lies_about_vectors_is_malformed_and_the_request_moves_on(lie):
    gw = _gateway({"liar": LyingEmbedder("liar", LIES[lie]), "honest": FakeNode("honest")})
    for _ in range(4):  # whichever the router picks first, every answer comes from the honest node
        r = gw.post("/v1/embeddings", json={"model": EMBED, "input": ["x", "y"]})
        assert r.status_code == 200, r.text
        assert r.headers["x-meritnet-node"] == "honest"
        assert [d["embedding"][0] for d in r.json()["data"]] == [1.0, 2.0]
    assert {rec.node_id for rec in list(gw.sink._records.values())} == {"honest"}


def test_a_base64_vector_holding_nan_is_malformed():
    nan = base64.b64encode(struct.pack("<2f", float("nan"), 1.0)).decode()
    liar = LyingEmbedder("liar", lambda body: _answer([{"index": 0, "embedding": nan}]))
    gw = _gateway({"liar": liar})
    r = gw.post("/v1/embeddings", json={"model": EMBED, "input": "x", "encoding_format": "base64"})
    assert r.status_code == 503, r.text
    assert liar.calls >= 1 and list(gw.sink._records.values()) == []

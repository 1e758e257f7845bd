"""Billing and the data path (issue 28, items 8-10): a node is paid for no more than the text the
client got, its ids are bounded by the vocabulary and max_tokens as they arrive (a violation is a
malformed answer that counts against it, never a 5xx), and what it sends for one request is bounded
in bytes and costs linear work. Fake nodes and fake tokenizers; no Ray, no vLLM."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from cluster.completions import answer_byte_cap, parse_body
from cluster.metering import MemoryUsageSink
from routing import metrics
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.metering import Tally, TokenCounter
from routing.selection import load_selector
from tests.support.gateway_fakes import CharTokenizer, FakeStream, LyingNode, actor_handle, node_stats

VOCAB = 1000  # the fake model's tokenizer: ids 0..999; 1 is a special id (BOS/EOS), 300 is "hello"


class WordTokenizer(CharTokenizer):
    """One token per character, except "hello", which is one token (id 300), as BPE would merge it."""

    def __len__(self):
        return VOCAB

    def encode(self, text, add_special_tokens=False):
        out = [1] if add_special_tokens else []
        for i, part in enumerate(text.split("hello")):
            out += ([300] if i else []) + [ord(c) for c in part]
        return out

    def decode(self, ids, skip_special_tokens=True):
        return "".join("hello" if i == 300 else chr(i) for i in ids if i > 1)


class BrokenTokenizer(WordTokenizer):
    """A tokenizer that fails on decode (as a Rust tokenizer does on an id it cannot hold)."""

    def decode(self, ids, skip_special_tokens=True):
        raise OverflowError("out of range integral type conversion attempted")


def _gateway(*nodes, tokenizer=WordTokenizer, vocab=None):
    sink = MemoryUsageSink()
    by_id = {n.node_id: n for n in nodes}
    counters = {} if tokenizer is None else {"default": TokenCounter(tokenizer(), 1024, vocab)}
    core = GatewayCore(
        GatewayConfig(),
        load_selector(registry=None),
        by_id.__getitem__,
        actor_handle(sink),
        registry=None,
        counters=counters,
    )
    core.set_nodes([node_stats(n) for n in by_id])
    return TestClient(build_fastapi(lambda: core)), sink


def _records(sink):
    return asyncio.run(sink.all())


def _whole(ids, text="hello"):
    """A node's whole answer with `ids` and `text` (as vLLM with return_token_ids writes it)."""
    choice = {"index": 0, "text": text, "finish_reason": "stop", "token_ids": ids}
    return FakeStream([json.dumps({"id": "x", "choices": [choice], "usage": None})])


def _event(ids, text="h", finish=None):
    choice = {"index": 0, "text": text, "finish_reason": finish, "token_ids": ids}
    return [f"data: {json.dumps({'choices': [choice]})}\n\n"]


BODY = {"model": "default", "prompt": "hi there", "max_tokens": 64}


# ---- item 8: padding ids, special ids and per-character tokenisations are not billed ----------------


@pytest.mark.parametrize(
    ("ids", "text", "billed"),
    [
        ([1000 + i for i in range(64)], "", 0),  # padding ids beyond the tokenizer, no text: nothing
        ([ord(c) for c in "hello"] + [1] * 20, "hello", 3),  # special ids: "hello" is 1 token + slack 2
        ([ord(c) for c in "hello"], "hello", 3),  # a per-character tokenisation of one token
        ([300], "hello", 1),  # the canonical tokenisation: exactly its ids
        ([300, 1], "hello", 2),  # and one end-of-sequence id
    ],
)
def test_a_node_is_billed_at_most_the_texts_tokens_plus_slack(ids, text, billed):
    liar = LyingNode("liar")
    liar._respond = lambda body, kind: _whole(ids, text)
    # the model's embedding is padded beyond its tokenizer: ids 1000..1099 are possible, never billable
    client, sink = _gateway(liar, vocab=1100)
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == billed
    assert _records(sink)[0].completion_tokens == billed


def test_without_a_tokenizer_ids_are_bounded_by_the_texts_bytes():
    liar = LyingNode("liar")
    liar._respond = lambda body, kind: _whole(list(range(2, 66)), "")  # 64 ids, no text
    client, sink = _gateway(liar, tokenizer=None)
    assert client.post("/v1/completions", json=BODY).status_code == 200
    assert _records(sink)[0].completion_tokens == 2  # the slack, not 64


# ---- item 9: ids out of bounds are the node's malformed answer, never a 500 --------------------------


@pytest.mark.parametrize(
    "ids",
    [
        [2**40],  # beyond any vocabulary (the parser's int32 bound)
        [104, VOCAB + 100],  # beyond this model's vocabulary
        [104] * 65,  # more ids than max_tokens (64)
    ],
)
def test_out_of_bound_ids_before_the_first_byte_move_the_request_and_count_against_the_node(ids):
    liar = LyingNode("liar")
    liar._respond = lambda body, kind: _whole(ids)
    client, sink = _gateway(liar, LyingNode("honest", usage=(9, 5), ids=[300]))
    before = metrics.MALFORMED.labels("liar")._value.get()
    for _ in range(3):
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 200 and r.headers["x-meritnet-node"] == "honest"
    assert {rec.node_id for rec in _records(sink)} == {"honest"}
    assert metrics.MALFORMED.labels("liar")._value.get() == before + 1  # then banned: tried once


def test_out_of_bound_ids_alone_are_a_clean_503_not_a_500():
    liar = LyingNode("liar")
    liar._respond = lambda body, kind: _whole([2**40])
    client, sink = _gateway(liar)
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_failed"
    assert _records(sink) == []  # nothing was forwarded, nothing is billed


@pytest.mark.parametrize("bad", [[2**40], [VOCAB], [104] * 64])
def test_out_of_bound_ids_mid_stream_end_in_a_clean_error_with_a_record(bad):
    liar = LyingNode("liar", chunks=[_event([104], "h")[0], _event(bad, "x")[0], "data: [DONE]\n\n"])
    client, sink = _gateway(liar)
    before = metrics.MALFORMED.labels("liar")._value.get()
    r = client.post("/v1/completions", json={**BODY, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"
    assert "[DONE]" not in r.text
    (rec,) = _records(sink)
    assert rec.status == "error" and rec.completion_tokens == 1  # the "h" that was forwarded
    assert metrics.MALFORMED.labels("liar")._value.get() == before + 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_tokenizer_failure_never_loses_the_record_or_gives_a_5xx(stream):
    client, sink = _gateway(LyingNode("liar", usage=(9, 5), ids=[300]), tokenizer=BrokenTokenizer)
    r = client.post("/v1/completions", json={**BODY, "stream": stream})
    assert r.status_code == 200 and "error" not in r.text
    (rec,) = _records(sink)
    assert rec.status == "ok" and rec.completion_tokens == 1  # bounded by the text "hello" (1 token)


# ---- item 10: bounded bytes per request, linear work ---------------------------------------------


def test_a_stream_beyond_the_requests_byte_cap_is_cut_off():
    """max_tokens 1 allows ~1 MiB; a node sending 64 KiB events without end is stopped there."""
    big = _event([], "x" * (64 << 10))
    sent = []

    class Endless(FakeStream):
        async def __anext__(self):
            sent.append(1)
            return big

    liar = LyingNode("liar")
    liar._respond = lambda body, kind: Endless([])
    client, sink = _gateway(liar)
    r = client.post("/v1/completions", json={**BODY, "max_tokens": 1, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"
    cap = answer_byte_cap(type("B", (), {"max_tokens": 1})())
    assert len(sent) <= cap // (64 << 10) + 2
    assert _records(sink)[0].status == "error"


def test_a_whole_answer_beyond_the_requests_byte_cap_is_malformed():
    liar = LyingNode("liar")
    liar._respond = lambda body, kind: _whole([300], "hello" + " " * (2 << 20))
    client, _ = _gateway(liar, LyingNode("honest", usage=(9, 5), ids=[300]))
    r = client.post("/v1/completions", json={**BODY, "max_tokens": 1})
    assert r.status_code == 200 and r.headers["x-meritnet-node"] == "honest"


def test_the_byte_cap_scales_with_max_tokens_and_n():
    class B:
        max_tokens, n, prompt = 100, 2, "hi"

    class Unbounded:
        max_tokens = None

    assert answer_byte_cap(B()) == (1 << 20) + 200 * (8 << 10)
    assert answer_byte_cap(Unbounded()) == 256 << 20


def test_id_accumulation_copies_each_id_once():
    """300 chunks of 1,000 ids: a tally that rebuilt its list per chunk would copy 45 million ids."""
    tally, chunks, size = Tally(vocab_size=VOCAB, per_choice=10**6), 300, 1000
    copied, held = 0, None
    chunk = json.dumps({"choices": [{"index": 0, "text": "h", "token_ids": [104] * size}]})
    for _ in range(chunks):
        tally.add(parse_body(chunk))
        now = tally.ids[0]
        copied += size if now is held else len(now)  # a new list copied everything it holds
        held = now
    assert len(tally.ids[0]) == chunks * size
    assert copied == chunks * size


def test_the_http_reader_stops_at_the_requests_byte_cap():
    """An open node's stream is cut off as soon as it passes the cap, before it is all in memory."""
    from cluster.nodes import HttpNode
    from cluster.records import NodeLink

    pulled = []

    class Response:
        status_code = 200

        async def aiter_raw(self):
            while True:
                pulled.append(1)
                yield b"data: " + b"x" * (256 << 10) + b"\n\n"

        async def aclose(self):
            pass

    class Client:
        def build_request(self, *args, **kwargs):
            return None

        async def send(self, request, stream=True):
            return Response()

    class Body:
        stream, max_tokens, n, prompt = True, 1, 1, "hi"

        def model_dump_json(self, **_):
            return "{}"

    link = NodeLink(endpoint="http://node.example:8000", secret="s")
    stream = HttpNode(link, Client()).call("completions", Body())

    async def drain():
        async for _ in stream:
            pass

    with pytest.raises(ValueError, match="larger than the request allows"):
        asyncio.run(drain())
    assert len(pulled) <= answer_byte_cap(Body()) // (256 << 10) + 1

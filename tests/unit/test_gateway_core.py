"""The gateway's request path over HTTP with fake nodes (no Ray, tests/support/gateway_fakes.py): retries,
streaming, metering."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from cluster.metering import MemoryUsageSink
from cluster.records import QualityScores
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.selection import load_selector
from routing.timeouts import Timeouts
from tests.support.gateway_fakes import FakeNode, FakeStream, actor_handle, node_stats
from tests.support.waiting import wait_until, wait_until_async


def _records(sink):
    import asyncio

    return asyncio.run(sink.all())


def _background_record(sink):
    """The one usage record of a request whose record is written in the background (up to 5 s)."""
    (rec,) = wait_until(lambda: _records(sink), timeout_s=5)
    return rec


def test_non_streaming_is_metered_with_the_usage_the_client_saw(harness):
    client, _, sink = harness
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    (rec,) = _records(sink)
    assert (
        rec.request_id == r.headers["x-meritnet-request-id"] and rec.node_id == r.headers["x-meritnet-node"]
    )
    assert (rec.prompt_tokens, rec.completion_tokens) == (r.json()["usage"]["prompt_tokens"], 2)


def test_failure_before_first_byte_retries_on_another_node(harness):
    client, nodes, sink = harness
    nodes["a"].fail_at = 0
    nodes["b"].fail_at = None
    for _ in range(3):
        r = client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
        assert r.status_code == 200 and r.headers["x-meritnet-node"] == "b"
    assert all(rec.node_id == "b" for rec in _records(sink))
    # The failing node was banned after its first failure: later requests did not even try it.
    assert nodes["a"].calls <= 1


def test_all_nodes_failing_is_503_not_500(harness):
    client, nodes, _ = harness
    nodes["a"].fail_at = nodes["b"].fail_at = 0
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_failed"


def test_when_every_node_is_below_the_quality_floor_the_best_serves_and_says_so(harness, caplog):
    """Issue 26: validators that misjudge every node of a model must not black out the endpoint."""
    from routing import metrics

    client, nodes, _ = harness
    client.core.selector.update_quality(QualityScores(epoch=1, quality={"a": 0.1, "b": 0.2}))
    degraded = metrics.DEGRADED.labels("default", "quality-floor")
    before = degraded._value.get()
    for _ in range(2):
        r = client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
        assert r.status_code == 200, r.text
        assert (r.headers["x-meritnet-node"], r.headers["x-meritnet-degraded"]) == ("b", "quality-floor")
    assert degraded._value.get() == before + 2 and nodes["a"].calls == 0 and nodes["b"].calls == 2
    warned = [m for m in caplog.messages if "would have refused every node of model 'default'" in m]
    assert len(warned) == 1  # one log line per cause per 10 s, however many requests
    assert client.get("/status.json").json()["degraded"]["default"]["filter"] == "quality-floor"
    assert "Degraded: filter quality-floor" in client.get("/status").text
    client.core.selector.update_quality(QualityScores(epoch=2, quality={"a": 0.9, "b": 0.2}))
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
    assert r.headers["x-meritnet-node"] == "a" and "x-meritnet-degraded" not in r.headers


def test_a_floor_that_refuses_is_503_and_counted_by_the_filter_that_refused(tmp_path, caplog):
    from routing import metrics
    from routing.router.config import DEFAULT_PROFILE_PATH

    strict = tmp_path / "strict.yaml"
    text = DEFAULT_PROFILE_PATH.read_text()
    strict.write_text(text.replace("{floor: 0.5}", "{floor: 0.5, serve_best_when_all_below: false}"))
    assert strict.read_text() != text
    nodes = {"a": FakeNode("a"), "b": FakeNode("b")}
    selector = load_selector(str(strict), registry=None)
    core = GatewayCore(
        GatewayConfig(), selector, nodes.__getitem__, actor_handle(MemoryUsageSink()), registry=None
    )
    core.set_nodes([node_stats("a"), node_stats("b")])
    client = TestClient(build_fastapi(lambda: core))
    core.selector.update_quality(QualityScores(epoch=1, quality={"a": 0.1, "b": 0.2}))
    refused = metrics.NO_NODE.labels("default", "quality-floor")
    before = refused._value.get()
    for _ in range(2):
        r = client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_live_node"
    assert refused._value.get() == before + 2 and nodes["a"].calls == nodes["b"].calls == 0
    warned = [m for m in caplog.messages if "filter 'quality-floor' removed every remaining candidate" in m]
    assert len(warned) == 1  # one log line per cause per 10 s, however many requests


def test_stream_strips_usage_chunk_unless_asked_but_meters_it(harness):
    client, _, sink = harness
    body = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True}).text
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all('"choices":[]' not in e for e in events)
    (rec,) = _records(sink)
    assert rec.completion_tokens == 2 and rec.status == "ok"


def test_stream_with_include_usage_passes_usage_through(harness):
    client, _, _ = harness
    body = client.post(
        "/v1/completions",
        json={"model": "default", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
    ).text
    usage = [json.loads(e[6:]) for e in body.split("\n\n") if '"choices":[]' in e]
    assert usage and usage[0]["usage"]["completion_tokens"] == 2


def test_mid_stream_failure_ends_with_an_error_event_and_no_done(harness):
    client, nodes, _sink = harness
    nodes["a"].fail_at = nodes["b"].fail_at = 1  # first chunk arrives, then the node dies
    body = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True}).text
    events = [e for e in body.split("\n\n") if e]
    assert "[DONE]" not in body and json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"


def test_api_keys_are_enforced_when_configured():
    from pydantic import SecretStr

    core = GatewayCore(GatewayConfig(api_keys=(SecretStr("k1"),)), load_selector(registry=None), {}.get, None)
    client = TestClient(build_fastapi(lambda: core))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"authorization": "Bearer k1"}).status_code == 200


def test_a_slow_node_is_left_only_for_another_and_waited_for_when_it_is_the_last(harness):
    """The adaptive first-byte timeout moves a request to another node; with nobody left it waits
    (up to timeouts.first_byte_s) instead of answering 503."""
    client, nodes, sink = harness
    for n in nodes.values():
        n.delay_s = 0.3
    client.core.selector.timeout_s = lambda node_id: 0.05  # far below the nodes' 0.3 s first byte
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True})
    assert r.status_code == 200, r.text
    assert sum(n.calls for n in nodes.values()) == 2  # left the first node, waited for the second
    (rec,) = _records(sink)
    assert rec.node_id == r.headers["x-meritnet-node"]


def test_a_hung_node_still_times_out(harness):
    client, nodes, _ = harness
    for n in nodes.values():
        n.delay_s = 5.0
    client.core.selector.timeout_s = lambda node_id: 0.05
    client.core.config = client.core.config.model_copy(update={"timeouts": Timeouts(first_byte_s=0.3)})
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True})
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_failed"


def test_the_total_limit_scales_with_the_requested_tokens():
    t = Timeouts(total_base_s=10, total_per_token_s=0.5, total_max_s=100)
    assert t.total_s(20) == 20.0
    assert t.total_s(20, n=3) == 40.0
    assert t.total_s(1000) == 100.0  # capped
    assert t.total_s(None) == 100.0  # unbounded tokens: the cap


def test_a_non_streamed_answer_is_held_to_its_total_limit_not_the_first_byte_one(harness):
    """Issue 13: a first-byte timeout separate from a total timeout scaled by max_tokens. A non-streamed
    answer slower than first_byte_s is waited for; one past base + per-token allowance is a 504, run
    once (not retried on every node with its time already spent)."""
    client, nodes, _sink = harness
    fast_first_byte = Timeouts(first_byte_s=0.05, total_base_s=5.0, total_per_token_s=0.1)
    client.core.config = client.core.config.model_copy(update={"timeouts": fast_first_byte})
    for node in nodes.values():
        node.delay_s = 0.3
    body = {"model": "default", "prompt": "hi", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert sum(n.calls for n in nodes.values()) == 1

    tight = Timeouts(total_base_s=0.1, total_per_token_s=0.05)  # 0.2 s for 2 tokens
    client.core.config = client.core.config.model_copy(update={"timeouts": tight})
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert sum(n.calls for n in nodes.values()) == 2  # one more call, on one node
    assert all(v == 0 for v in client.core._in_flight.values())


def test_a_stream_that_trickles_past_its_total_limit_ends_with_a_timeout_event(harness):
    """A node that keeps each gap under stream_idle_s but never finishes is still cut off."""
    client, nodes, sink = harness
    tight = Timeouts(stream_idle_s=5.0, total_base_s=0.2, total_per_token_s=0.01)
    client.core.config = client.core.config.model_copy(update={"timeouts": tight})

    class _Trickle(FakeStream):
        async def __anext__(self):
            if self._i >= 1:
                import asyncio

                await asyncio.sleep(0.15)  # every gap well under the idle limit
            return await super().__anext__()

    for node in nodes.values():
        respond = node._respond
        node._respond = lambda body, kind, respond=respond: _Trickle(respond(body, kind)._items * 4)
    body = {"model": "default", "prompt": "hi", "stream": True, "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[-1][6:])["error"]["code"] == "timeout" and "[DONE]" not in r.text
    rec = _background_record(sink)
    assert rec.status == "error" and client.core._in_flight[rec.node_id] == 0


async def test_a_client_that_leaves_before_the_answer_frees_the_node_and_leaves_one_cancelled_record():
    """Issue 13: a non-streaming client's disconnect cancels the request task while the node works; the
    node's in-flight count used to leak and no record was written."""
    import asyncio

    from ray.serve.llm.openai_api_models import CompletionRequest
    from starlette.requests import Request

    node = FakeNode("a")
    node.delay_s = 5.0  # the node is slow to answer; the client gives up while it works
    sink = MemoryUsageSink()
    core = GatewayCore(
        GatewayConfig(), load_selector(registry=None), {"a": node}.__getitem__, actor_handle(sink), None
    )
    core.set_nodes([node_stats("a")])
    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []})
    body = CompletionRequest(model="default", prompt="hi", max_tokens=4)
    task = asyncio.ensure_future(core.handle(request, body, "completions"))
    await wait_until_async(lambda: core._in_flight["a"] == 1)  # the node has the request
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_async(sink.all)  # the cancelled record is written in the background
    assert core._in_flight["a"] == 0
    (rec,) = await sink.all()
    assert rec.status == "cancelled" and rec.node_id == "a"


def test_with_api_keys_required_validator_challenges_still_get_through():
    """Issue 13: with api_keys set, validators got 401 on every challenge, every node scored 0."""
    from pydantic import SecretStr

    node = FakeNode("a")
    cfg = GatewayConfig(api_keys=(SecretStr("client-key"),), challenge_keys=(SecretStr("validator-key"),))
    core = GatewayCore(cfg, load_selector(registry=None), {"a": node}.__getitem__, None, registry=None)
    core.set_nodes([node_stats("a")])
    client = TestClient(build_fastapi(lambda: core))
    body = {"model": "default", "prompt": "hi", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 401
    assert (
        client.post("/v1/completions", json=body, headers={"authorization": "Bearer nope"}).status_code == 401
    )
    assert (
        client.post("/v1/completions", json=body, headers={"authorization": "Bearer client-key"}).status_code
        == 200
    )
    pinned = {"x-meritnet-node": "a", "x-meritnet-challenge-key": "validator-key"}
    assert client.post("/v1/completions", json=body, headers=pinned).status_code == 200
    wrong = {"x-meritnet-node": "a", "x-meritnet-challenge-key": "guess"}
    assert client.post("/v1/completions", json=body, headers=wrong).status_code == 401


def test_a_long_non_streamed_answer_is_waited_for_not_moved(harness):
    """Issue 13: the TTFT-based timeout fired on non-streamed answers (their first message is the whole
    generation), banned a healthy node and ran the work twice."""
    client, nodes, _sink = harness
    client.core.selector.timeout_s = lambda node_id: 0.05  # a node's usual TTFT: 50 ms
    for node in nodes.values():
        node.delay_s = 0.5  # the whole answer takes 10x that
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    assert sum(n.calls for n in nodes.values()) == 1  # run once, on one node
    streamed = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True})
    assert (
        streamed.status_code == 200 and sum(n.calls for n in nodes.values()) == 3
    )  # a slow first token moves


def test_a_node_that_stalls_mid_stream_is_cut_off_with_a_clean_error(harness):
    """Issue 13: a node that stops sending in the middle of a stream left the client hanging."""
    client, nodes, sink = harness
    client.core.config = client.core.config.model_copy(update={"timeouts": Timeouts(stream_idle_s=0.2)})

    class _Stall(FakeStream):
        async def __anext__(self):
            if self._i == 1:
                import asyncio

                await asyncio.sleep(30)  # sends one chunk, then nothing
            return await super().__anext__()

    for node in nodes.values():
        respond = node._respond
        node._respond = lambda body, kind, respond=respond: _Stall(respond(body, kind)._items)
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted" and "[DONE]" not in r.text
    rec = _background_record(sink)
    assert rec.status == "error" and client.core._in_flight[rec.node_id] == 0


def test_latency_histograms_carry_the_node_and_streams_record_their_gaps(harness):
    from routing import metrics

    client, _nodes, _sink = harness

    def count(name: str, node: str) -> float:
        return metrics.REGISTRY.get_sample_value(f"{name}_count", {"model": "default", "node": node}) or 0.0

    before = {n: count("meritnet_inter_token_seconds", n) for n in ("a", "b")}
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True})
    node = r.headers["x-meritnet-node"]
    assert count("meritnet_inter_token_seconds", node) == before[node] + 1  # two messages: one gap
    assert count("meritnet_ttft_seconds", node) >= 1 and count("meritnet_request_seconds", node) >= 1


def test_a_node_stream_cancelled_under_the_gateway_is_a_node_failure_not_a_client_leaving(harness):
    """Ray may end a dead replica's stream with CancelledError: the client still gets a clean error
    event and the request an 'error' record (a 'cancelled' record is for clients that left)."""
    import asyncio

    client, nodes, sink = harness

    class _Dies(FakeStream):
        async def __anext__(self):
            if self._i == 1:
                raise asyncio.CancelledError()
            return await super().__anext__()

    for node in nodes.values():
        respond = node._respond
        node._respond = lambda body, kind, respond=respond: _Dies(respond(body, kind)._items)
    r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"
    rec = _background_record(sink)
    assert rec.status == "error"


def test_every_request_reaches_its_node_with_a_seed_and_a_client_seed_is_kept(harness):
    client, nodes, _ = harness
    for body in ({}, {}, {"seed": 7}):
        r = client.post("/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2, **body})
        assert r.status_code == 200
    seeds = [b.seed for node in nodes.values() for b in node.bodies]
    assert len(seeds) == 3 and None not in seeds and 7 in seeds
    assert len(set(seeds)) == 3  # drawn per request: a seed tells a node nothing


def test_the_clients_body_is_never_changed_and_the_node_gets_one_copy_made_final(harness, monkeypatch):
    client, nodes, _ = harness
    core, parsed = client.core, []
    parse = core.parse

    async def keep(request, model):
        parsed.append(await parse(request, model))
        return parsed[-1]

    monkeypatch.setattr(core, "parse", keep)
    r = client.post(
        "/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2, "stream": True}
    )
    assert r.status_code == 200
    (body,) = parsed
    (sent,) = [b for node in nodes.values() for b in node.bodies]
    assert (body.seed, body.return_token_ids, body.stream_options) == (None, None, None)
    assert sent.seed is not None and sent.return_token_ids and sent.stream_options.include_usage
    assert sent.request_id == r.headers["x-meritnet-request-id"]


def test_metrics_page_serves_scoring_and_settlement_metrics_and_survives_a_silent_actor(harness):
    import asyncio

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from scoring import metrics as scoring_metrics
    from settlement import metrics as settlement_metrics

    class Actor:
        def __init__(self, registry):
            self.registry, self.silent = registry, False

            async def text():
                if self.silent:
                    await asyncio.sleep(60)  # hangs: the scrape must not wait for it
                return generate_latest(self.registry).decode()

            self.metrics_text = type("M", (), {"remote": staticmethod(text)})

    client, _, _ = harness
    actors = {
        GatewayConfig().consensus_name: Actor(scoring_metrics.REGISTRY),
        GatewayConfig().settlement_name: Actor(settlement_metrics.REGISTRY),
    }
    scoring_metrics.NODE_QUALITY.labels("a").set(0.75)

    async def named(name):
        return actors.get(name)

    client.core._registry, client.core.refresher.named_actor = object(), named

    def families():
        r = client.get("/metrics")
        assert r.status_code == 200
        return {f.name: f for f in text_string_to_metric_families(r.text)}

    first = families()
    assert {"meritnet_node_consensus_quality", "meritnet_settlement_last_settled_epoch"} <= set(first)
    assert "meritnet_requests" in first  # the gateway's own
    (sample,) = [s for s in first["meritnet_node_consensus_quality"].samples if s.labels == {"node": "a"}]
    assert sample.value == 0.75
    actors[GatewayConfig().settlement_name].silent = True
    assert "meritnet_settlement_last_settled_epoch" in families()  # its last text still serves

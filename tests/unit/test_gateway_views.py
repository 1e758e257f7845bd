"""The read-only pages never queue a call per client request on a control-plane actor (issue 28 item 13):
routing/views.py's ActorCache, alone and behind the gateway's HTTP app."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from routing import errors
from routing.app import build_fastapi
from routing.views import ActorCache
from settlement.keys import SettlerKey
from tests.support.clock import Clock
from tests.support.waiting import wait_until_async


class SlowSettlement:
    """A single-threaded settlement actor stand-in: answers one call at a time, slowly, and counts the
    calls it was sent and the most that waited on it at once."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s, self.calls, self.waiting, self.most_waiting = delay_s, 0, 0, 0
        self._busy = asyncio.Lock()
        outer = self

        def method(answer):
            async def remote(*args):
                outer.calls += 1
                outer.waiting += 1
                outer.most_waiting = max(outer.most_waiting, outer.waiting)
                try:
                    async with outer._busy:
                        await asyncio.sleep(outer.delay_s)
                        return answer(*args)
                finally:
                    outer.waiting -= 1

            return type("Method", (), {"remote": staticmethod(remote)})

        self.recent_epochs = method(
            lambda n: [{"epoch": 3, "tx": "0x01", "rewards": {}, "validator_rewards": {}}]
        )
        self.rewards_of = method(lambda a: {"operator": a, "cumulative_wei": "7"})
        self.reward_proof_of = method(lambda a: {"operator": a, "error": f"{a} has no reward"})
        self.metrics_text = method(lambda: "settlement_up 1\n")


def test_one_call_per_key_in_flight_and_fresh_answers_are_reused():
    clock, calls = Clock(), []

    async def fetch():
        calls.append(clock.t)
        await asyncio.sleep(0.01)
        return len(calls)

    async def main():
        cache = ActorCache(ttl_s=5.0, clock=clock)
        first = await asyncio.gather(*(cache.get("k", fetch) for _ in range(20)))
        assert first == [1] * 20 and len(calls) == 1  # 20 callers, one call
        clock.t += 4.0
        assert await cache.get("k", fetch) == 1 and len(calls) == 1  # still fresh
        clock.t += 2.0
        assert await cache.get("k", fetch) == 1  # stale: served at once while one refresh runs
        await wait_until_async(lambda: not cache._pending())  # the refresh has answered
        assert len(calls) == 2 and await cache.get("k", fetch) == 2

    asyncio.run(main())


def test_a_failing_or_hanging_actor_keeps_the_last_answer_and_a_first_failure_is_a_503():
    clock = Clock()

    async def hang():
        await asyncio.sleep(60)

    async def main():
        cache = ActorCache(ttl_s=1.0, timeout_s=0.05, clock=clock)
        with pytest.raises(errors.APIError) as err:
            await cache.get("k", hang)
        assert err.value.status == 503

        async def ok():
            return "v1"

        assert await cache.get("k", ok) == "v1"
        clock.t += 2.0
        assert await cache.get("k", hang) == "v1"  # stale, refresh hangs and times out
        await wait_until_async(lambda: not cache._pending())  # the refresh has timed out
        assert await cache.get("k", hang) == "v1"

    asyncio.run(main())


def test_distinct_keys_wait_in_the_replica_and_beyond_max_pending_are_refused():
    async def fetch():
        await asyncio.sleep(0.01)
        return "v"

    async def main():
        cache = ActorCache(ttl_s=5.0, max_pending=4, max_keys=8)
        results = await asyncio.gather(*(cache.get(i, fetch) for i in range(10)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, errors.APIError)]
        assert len(refused) == 6 and all(r.status == 503 for r in refused)
        assert results[:4] == ["v"] * 4 and cache.calls == 4
        assert len(cache._entries) <= 8

    asyncio.run(main())


def test_a_flood_of_page_requests_sends_the_settlement_actor_one_call_at_a_time(harness):
    """200 concurrent requests for /status.json and 50 distinct operators' pages and proofs: the actor
    never has more than one call from this replica waiting, each key is asked once, and the pages
    still answer (a 503 only for what waited beyond the bound)."""
    client, _, _ = harness
    core = client.core
    actor = SlowSettlement()

    async def named(name):
        return actor if name == core.config.settlement_name else None

    core._registry, core.refresher.named_actor = object(), named
    addresses = [SettlerKey.generate().address for _ in range(50)]

    async def main():
        transport = httpx.ASGITransport(app=build_fastapi(lambda: core))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            paths = ["/status.json"] * 200
            paths += [f"/v1/operators/{a}" for a in addresses] + [
                f"/v1/operators/{a}/proof" for a in addresses
            ]
            return await asyncio.gather(*(http.get(p) for p in paths))

    answers = asyncio.run(main())
    assert actor.most_waiting == 1
    assert actor.calls <= 1 + 2 * len(addresses)  # one per key, never one per request
    status = answers[:200]
    assert all(r.status_code == 200 for r in status)
    assert all(r.json()["epochs"][0]["epoch"] == 3 for r in status)
    operators = answers[200:250]
    assert {r.status_code for r in operators} <= {200, 503}
    assert [r for r in operators if r.status_code == 200]
    assert all(r.json()["rewards"]["cumulative_wei"] == "7" for r in operators if r.status_code == 200)
    assert {r.status_code for r in answers[250:]} <= {404, 503}


def test_the_catalogue_lists_live_models_with_context_length_nodes_and_pricing_and_404s_the_rest():
    """Issue 30: /v1/models entries say what a client scanning models reads; /v1/models/{id} is one
    entry or an OpenAI-shaped 404."""
    from routing.config import GatewayConfig
    from routing.gateway import GatewayCore
    from routing.metering import MeteredModel
    from routing.selection import load_selector
    from tests.support.gateway_fakes import FakeNode, node_stats

    price = {"input_per_million": 0.1, "output_per_million": 0.4, "currency": "USD"}
    config = GatewayConfig(
        metered_models={"default": MeteredModel(source="unused", max_model_len=1024)},
        pricing={"default": price},
    )
    nodes = {"a": FakeNode("a"), "b": FakeNode("b")}
    core = GatewayCore(config, load_selector(registry=None), nodes.__getitem__, None, counters={})
    core.set_nodes([node_stats("a"), node_stats("b"), node_stats("c", live=False, model_id="other")])
    client = TestClient(build_fastapi(lambda: core))
    listed = client.get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["default"]  # "other" has no live node
    (entry,) = listed["data"]
    assert entry == {
        "id": "default",
        "object": "model",
        "created": 0,
        "owned_by": "meritnet",
        "context_length": 1024,
        "capabilities": ["chat", "completions", "json_schema", "tools"],
        "nodes": 2,
        "pricing": price,  # from the network config
    }
    assert client.get("/v1/models/default").json() == entry
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_receipts_are_served_from_the_settlement_actor_and_refused_cleanly(harness):
    client, _, _ = harness
    rid = "ab" * 16
    doc = {"request_id": rid, "status": "settled", "epoch": 3, "value": [], "proof": [], "root": "0x00"}

    class Actor:
        async def _receipt(request_id):
            return doc if request_id == rid else {"request_id": request_id, "error": "no usage record"}

        receipt_of = type("M", (), {"remote": staticmethod(_receipt)})

    async def named(_name):
        return Actor

    client.core._registry, client.core.refresher.named_actor = object(), named
    assert client.get(f"/v1/receipts/{rid}").json() == doc
    unknown = client.get(f"/v1/receipts/{'cd' * 16}")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "no_receipt"
    assert client.get("/v1/receipts/not-an-id").status_code == 400

    async def none(_name):
        return None

    client.core.refresher.named_actor = none
    assert client.get(f"/v1/receipts/{rid}").json()["error"]["code"] == "no_settlement"

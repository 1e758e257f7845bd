"""Key budgets (issue 30): enforced at admission from the usage ledger that settles (deploy/usage.py's
UsageStore, a real SQLite ledger, no Ray), worst case reserved, refunded to the billed count at the end;
OpenAI's 429 insufficient_quota with Retry-After at the window's reset. Fake nodes, no vLLM."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time

import httpx
import pytest

from deploy.usage import UsageStore
from routing.app import build_fastapi
from routing.budgets import window
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.keys import KeyStore
from routing.metering import TokenCounter
from routing.selection import load_selector
from tests.support.gateway_fakes import CharTokenizer, FakeNode, actor_handle, node_stats

BODY = {"model": "default", "prompt": "hi", "max_tokens": 100}
RESERVED = 3 + 100  # BOS + "hi", and max_tokens
BILLED = 3 + len("hello world")  # what the fake node's answer is billed


def _utc(*args) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", _utc(2026, 12, 31, 23, 59), _utc(2026, 12, 31), _utc(2027, 1, 1)),
        ("week", _utc(2026, 12, 7, 0, 0, 1), _utc(2026, 12, 7), _utc(2026, 12, 14)),  # a Monday
        ("week", _utc(2026, 12, 13, 23), _utc(2026, 12, 7), _utc(2026, 12, 14)),  # its Sunday
        ("month", _utc(2026, 12, 15), _utc(2026, 12, 1), _utc(2027, 1, 1)),
        ("month", _utc(2028, 2, 29, 12), _utc(2028, 2, 1), _utc(2028, 3, 1)),
    ],
)
def test_windows_are_utc_calendar_periods(period, now, start, end):
    assert window(period, now) == (start, end)


def _gateway(tmp_path, node, budget: int):
    store = UsageStore(str(tmp_path / "usage.db"), epoch_length_s=3600.0)
    key, secret = KeyStore(tmp_path / "keys.json").create(budget_tokens=budget, budget_period="day")
    core = GatewayCore(
        GatewayConfig(keys_file=str(tmp_path / "keys.json")),
        load_selector(registry=None),
        {"a": node}.__getitem__,
        actor_handle(store),
        None,
        counters={"default": TokenCounter(CharTokenizer(), 1024)},
    )
    core.set_nodes([node_stats("a")])
    transport = httpx.ASGITransport(app=build_fastapi(lambda: core))
    http = httpx.AsyncClient(
        transport=transport, base_url="http://gw", headers={"authorization": f"Bearer {secret}"}
    )
    return http, store, key


def test_32_concurrent_requests_never_spend_past_the_budget_and_the_rest_get_insufficient_quota(tmp_path):
    node = FakeNode("a")
    node.delay_s = 0.2  # all 32 are admitted or refused while the first ones still run
    budget = 5 * RESERVED + 50

    async def run():
        http, store, key = _gateway(tmp_path, node, budget)
        answers = await asyncio.gather(*(http.post("/v1/completions", json=BODY) for _ in range(32)))
        return answers, store, key

    sent_at = time.time()  # before any request: the longest Retry-After the refusals can carry
    answers, store, key = asyncio.run(run())
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 5 and codes.count(429) == 27, codes  # 5 worst cases fit at once, not 6
    refused = next(a for a in answers if a.status_code == 429)
    err = refused.json()["error"]
    assert err["type"] == err["code"] == "insufficient_quota"
    reset_in = window("day", sent_at)[1] - sent_at  # refused later: the reset is nearer, never farther
    assert 0 < int(refused.headers["retry-after"]) <= math.ceil(reset_in)
    spent = store._ledger.key_spent(key.key_id, window("day", time.time())[0])
    assert spent == 5 * BILLED <= budget
    assert not store._holds  # every hold ended: 5 billed records, 27 released refusals


def test_what_was_not_spent_is_refunded_and_the_budget_is_spent_to_its_last_request(tmp_path):
    budget = 2 * RESERVED

    async def run():
        http, store, key = _gateway(tmp_path, FakeNode("a"), budget)
        codes = []
        for _ in range(40):  # one at a time: each holds 103 and is billed 14
            r = await http.post("/v1/completions", json=BODY)
            codes.append(r.status_code)
            if r.status_code == 429:
                break
        return codes, store._ledger.key_spent(key.key_id, 0.0)

    codes, spent = asyncio.run(run())
    assert codes[-1] == 429 and set(codes[:-1]) == {200}
    assert spent <= budget < spent + RESERVED  # refused only once the worst case no longer fits
    assert spent == (len(codes) - 1) * BILLED


def test_a_request_no_node_answered_returns_its_hold(tmp_path):
    from tests.support.waiting import wait_until_async

    node = FakeNode("a")
    node.fail_at = 0  # the node fails before a byte: 502/503 to the client, no billed record

    async def run():
        http, store, _ = _gateway(tmp_path, node, RESERVED)
        r = await http.post("/v1/completions", json=BODY)
        await wait_until_async(lambda: not store._holds, timeout_s=5)  # released, not left to expire
        return r.status_code

    assert asyncio.run(run()) >= 500


def test_a_restarted_store_still_counts_the_holds_of_running_requests(tmp_path):
    """The store dies while requests run (a new UsageStore on the same files, as Ray restarts it): their
    holds are reloaded, so a request that would overspend is still refused; a hold whose record was
    written, and an expired one, are not."""
    from cluster.records import UsageRecord

    path, day = str(tmp_path / "usage.db"), window("day", time.time())[0]

    async def run():
        first = UsageStore(path, epoch_length_s=3600.0)
        assert await first.reserve("k", "running", 300, 500, day, 600.0) == 300
        assert await first.reserve("k", "ended", 100, 500, day, 600.0) == 400
        assert await first.reserve("k", "stale", 50, 500, day, -1.0) == 450  # expires at once
        now = time.time()
        record = UsageRecord(
            request_id="ended",
            node_id="a",
            operator="0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
            model="default",
            prompt_tokens=10,
            completion_tokens=20,
            started_at=now,
            ended_at=now,
            status="ok",
            key_id="k",
        )
        await asyncio.to_thread(first._ledger.append, [record])  # written; the store died before the drop
        second = UsageStore(path, epoch_length_s=3600.0)
        assert set(second._holds) == {"running"}
        refused = await second.reserve("k", "next", 200, 500, day, 600.0)  # 30 spent + 300 held + 200
        admitted = await second.reserve("k", "small", 170, 500, day, 600.0)
        return refused, admitted

    refused, admitted = asyncio.run(run())
    assert refused == -1 - 330 and admitted == 500


def test_an_unreadable_holds_file_is_set_aside_and_the_store_starts(tmp_path):
    (tmp_path / "usage.db.holds").write_bytes(b"not a database" * 100)

    async def run():
        store = UsageStore(str(tmp_path / "usage.db"), epoch_length_s=3600.0)
        return await store.reserve("k", "r", 10, 100, 0.0, 60.0)

    assert asyncio.run(run()) == 10
    assert (tmp_path / "usage.db.holds.unreadable").is_file()

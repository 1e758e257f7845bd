"""Token limits hold under concurrency (issue 28, item 11): a key's token bucket is charged at
admission with all a request may use (its prompt and max_tokens x n), refused with an OpenAI-shaped
429 when that does not fit, and settled to what was billed however the request ends (ok, error,
cancelled). Fake nodes, a frozen clock; no Ray, no vLLM."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.keys import ClientKey, KeyStore, RateLimiter
from routing.metering import TokenCounter
from routing.selection import load_selector
from tests.support.gateway_fakes import CharTokenizer, ErrorNode, FakeNode, node_stats
from tests.support.waiting import wait_until_async

LIMIT = 200  # tokens per minute
# prompt "hi" = BOS + 2 characters; max_tokens 100: 103 tokens held while it runs
BODY = {"model": "default", "prompt": "hi", "max_tokens": 100}
BILLED = 3 + len("hello world")  # the fake node's answer (its ids do not decode to it: the text's tokens)


def _gateway(tmp_path, node):
    _, secret = KeyStore(tmp_path / "keys.json").create(tokens_per_min=LIMIT)
    core = GatewayCore(
        GatewayConfig(keys_file=str(tmp_path / "keys.json")),
        load_selector(registry=None),
        {"a": node}.__getitem__,
        None,
        None,
        counters={"default": TokenCounter(CharTokenizer(), 1024)},
    )
    core.set_nodes([node_stats("a")])
    core.keys.limiter = RateLimiter(lambda: 1000.0)  # frozen: the bucket never refills in a test
    transport = httpx.ASGITransport(app=build_fastapi(lambda: core))
    http = httpx.AsyncClient(
        transport=transport, base_url="http://gw", headers={"authorization": f"Bearer {secret}"}
    )
    return http, core


def _level(core) -> float:
    (key,) = list(core.keys._by_hash.values())
    return core.keys.limiter._level(key.key_id, "tokens", LIMIT).level


async def _settled(core):
    """A record written in the background settles the reservation within a few loop turns."""
    await wait_until_async(lambda: core.keys.limiter.held() == 0, timeout_s=5)


def test_concurrent_requests_cannot_spend_the_same_tokens(tmp_path):
    node = FakeNode("a")
    node.delay_s = 0.2  # both requests are in flight at once

    async def run():
        http, core = _gateway(tmp_path, node)
        first, second = await asyncio.gather(
            http.post("/v1/completions", json=BODY), http.post("/v1/completions", json=BODY)
        )
        return core, sorted([first.status_code, second.status_code]), [first, second]

    core, codes, responses = asyncio.run(run())
    assert codes == [200, 429]  # 103 + 103 > 200: the second does not fit while the first runs
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error" and float(refused.headers["retry-after"]) > 0
    assert core.keys.limiter.held() == 0 and _level(core) == LIMIT - BILLED  # settled: 103 - 14 refunded


@pytest.mark.parametrize(
    ("case", "billed"),
    [
        ("ok", BILLED),
        ("all nodes fail", 0),
        ("engine 4xx", 0),
        ("mid-stream failure", 3 + 2),  # prompt + the "he" forwarded before the node died
        ("cancelled", 3),  # the client left before a byte: its prompt
    ],
)
def test_every_end_settles_the_reservation(tmp_path, case, billed):
    node = ErrorNode("a", 400) if case == "engine 4xx" else FakeNode("a")
    body, timeout = dict(BODY), None
    if case == "all nodes fail":
        node.fail_at = 0
    elif case == "mid-stream failure":
        node.fail_at, body["stream"] = 1, True
    elif case == "cancelled":
        node.delay_s, timeout = 5.0, 0.2

    async def run():
        http, core = _gateway(tmp_path, node)
        try:
            await asyncio.wait_for(http.post("/v1/completions", json=body), timeout)
        except TimeoutError:
            pass
        await _settled(core)
        return core

    core = asyncio.run(run())
    assert core.keys.limiter.held() == 0
    assert _level(core) == LIMIT - billed


def test_a_reservation_larger_than_the_limit_needs_a_full_bucket():
    limiter = RateLimiter(lambda: 0.0)
    key = ClientKey(key_id="k", sha256="0" * 64, tokens_per_min=100)
    assert limiter.reserve(key, "r1", 10**6) is None  # holds all 100
    assert limiter.reserve(key, "r2", 1) == pytest.approx(0.6)  # nothing left: 1 token in 0.6 s
    limiter.settle(key, "r1", 150)  # used more than a minute's allowance: the bucket is overdrawn
    assert limiter._level("k", "tokens", 100).level == -50
    limiter.settle(key, "r1", 150)  # settled once: a second settle charges nothing more
    assert limiter._level("k", "tokens", 100).level == -50

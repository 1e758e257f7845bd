"""Client keys (issue 13): stored hashed, created/revoked/listed by `meritnet keys`, per-key rate limits
(429 with Retry-After), model allow-lists (403); revocation takes effect without a restart."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.keys import ClientKey, KeyStore, RateLimiter, hash_key
from routing.selection import load_selector
from tests.support.clock import Clock
from tests.support.gateway_fakes import FakeNode, node_stats

BODY = {"model": "default", "prompt": "hi", "max_tokens": 2}


def _gateway(keys_file, clock=None):
    core = GatewayCore(
        GatewayConfig(keys_file=str(keys_file)),
        load_selector(registry=None),
        {"a": FakeNode("a")}.__getitem__,
        None,
        None,
    )
    core.set_nodes([node_stats("a")])
    if clock is not None:
        core.keys.limiter = RateLimiter(clock)
    return TestClient(build_fastapi(lambda: core)), core


def _auth(secret):
    return {"authorization": f"Bearer {secret}"}


def test_keys_are_stored_hashed_and_private(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    key, secret = store.create(requests_per_min=5)
    raw = (tmp_path / "keys.json").read_text()
    assert secret not in raw and hash_key(secret) in raw and key.key_id in raw
    assert oct((tmp_path / "keys.json").stat().st_mode & 0o777) == "0o600"


def test_request_rate_limit_gives_429_with_retry_after_then_refills(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    _, secret = store.create(requests_per_min=2)
    clock = Clock()
    client, _ = _gateway(tmp_path / "keys.json", clock)
    assert [
        client.post("/v1/completions", json=BODY, headers=_auth(secret)).status_code for _ in range(2)
    ] == [200, 200]
    r = client.post("/v1/completions", json=BODY, headers=_auth(secret))
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) == 30  # one request per 30 s refills
    clock.t += 30
    assert client.post("/v1/completions", json=BODY, headers=_auth(secret)).status_code == 200


def test_token_rate_limit_charges_what_was_billed(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    _, secret = store.create(tokens_per_min=6)  # the fake node's answer bills 3 + 2 = 5 tokens
    clock = Clock()
    client, core = _gateway(tmp_path / "keys.json", clock)
    # the request may use more than a minute's allowance: it holds the whole bucket, settles to 5
    assert client.post("/v1/completions", json=BODY, headers=_auth(secret)).status_code == 200
    r = client.post("/v1/completions", json=BODY, headers=_auth(secret))  # 1 left: 6 do not fit
    assert r.status_code == 429 and int(r.headers["retry-after"]) == 50
    assert core.keys.limiter.held() == 0
    clock.t += 50
    assert client.post("/v1/completions", json=BODY, headers=_auth(secret)).status_code == 200


def test_model_allow_list_and_revocation_without_restart(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    key, secret = store.create(models=("other",))
    _, good = store.create()
    client, core = _gateway(tmp_path / "keys.json")
    r = client.post("/v1/completions", json=BODY, headers=_auth(secret))
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert client.post("/v1/completions", json=BODY).status_code == 401
    assert client.post("/v1/completions", json=BODY, headers=_auth("mn-guess")).status_code == 401
    assert client.post("/v1/completions", json=BODY, headers=_auth(good)).status_code == 200
    store.revoke(key.key_id)
    import os

    os.utime(tmp_path / "keys.json", (0, 12345))  # a distinct mtime even within the same clock tick
    core.keys.reload()  # what the background refresh does every 0.5 s
    assert client.post("/v1/completions", json=BODY, headers=_auth(secret)).status_code == 401


def test_keys_cli_create_list_revoke(tmp_path):
    from deploy.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app, ["keys", "create", "--rpm", "60", "--model", "default", "--state-dir", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    secret = next(line for line in r.output.splitlines() if line.startswith("mn-"))
    (key,) = KeyStore(tmp_path / "keys.json").load()
    assert key.sha256 == hash_key(secret) and key.requests_per_min == 60 and key.models == ("default",)
    listed = runner.invoke(app, ["keys", "list", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert key.key_id in listed.output and secret not in listed.output
    assert runner.invoke(app, ["keys", "revoke", key.key_id, "--state-dir", str(tmp_path)]).exit_code == 0
    assert KeyStore(tmp_path / "keys.json").load()[0].revoked
    assert runner.invoke(app, ["keys", "revoke", "k-nope", "--state-dir", str(tmp_path)]).exit_code == 1


def test_config_keys_are_hashed_too():
    from pydantic import SecretStr

    core = GatewayCore(
        GatewayConfig(api_keys=(SecretStr("s3cret"),)),
        load_selector(registry=None),
        {}.__getitem__,
        None,
        None,
    )
    stored = core.keys._by_hash
    assert list(stored) == [hash_key("s3cret")] and all(isinstance(k, ClientKey) for k in stored.values())
    assert "s3cret" not in json.dumps([k.model_dump() for k in stored.values()])


@pytest.mark.parametrize("bad", ["", "Bearer", "Basic abc", "Bearer  "])
def test_malformed_authorization_is_401(tmp_path, bad):
    KeyStore(tmp_path / "keys.json").create()
    client, _ = _gateway(tmp_path / "keys.json")
    assert client.post("/v1/completions", json=BODY, headers={"authorization": bad}).status_code == 401


def test_the_usage_record_names_the_key_id_never_the_key(tmp_path):
    import asyncio

    from cluster.metering import MemoryUsageSink
    from tests.support.gateway_fakes import actor_handle

    key, secret = KeyStore(tmp_path / "keys.json").create()
    sink = MemoryUsageSink()
    core = GatewayCore(
        GatewayConfig(keys_file=str(tmp_path / "keys.json")),
        load_selector(registry=None),
        {"a": FakeNode("a")}.__getitem__,
        actor_handle(sink),
        None,
    )
    core.set_nodes([node_stats("a")])
    client = TestClient(build_fastapi(lambda: core))
    assert client.post("/v1/completions", json=BODY, headers=_auth(secret)).status_code == 200
    (rec,) = asyncio.run(sink.all())
    assert rec.key_id == key.key_id and secret not in rec.model_dump_json()

"""Property test of the HTTP surface (issue 13): 2,000+ generated requests (arbitrary JSON, and valid
requests with fields replaced by arbitrary values) against the gateway with a fake node. No response
is a 5xx; every error is OpenAI-shaped; the gateway still serves a normal request afterwards."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.selection import load_selector
from tests.support.gateway_fakes import FakeNode, node_stats
from tests.support.http_fuzz import BASES, PARAMS, check, json_values


class _ChatNode(FakeNode):
    """Answers chat like completions (the gateway only relays it); a subclass, so FakeNode stays as is."""

    @property
    def chat(self):
        return self.completions


def _gateway():
    node = _ChatNode("a")
    core = GatewayCore(GatewayConfig(), load_selector(registry=None), {"a": node}.__getitem__, None, None)
    core.set_nodes([node_stats("a")])
    return TestClient(build_fastapi(lambda: core), raise_server_exceptions=False)


CLIENT = _gateway()


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(base=st.sampled_from(BASES), changes=st.dictionaries(st.sampled_from(PARAMS), json_values, max_size=4))
def test_valid_requests_with_arbitrary_fields_never_5xx(base, changes):
    path, body = base
    check(
        CLIENT.post(
            path, content=json.dumps({**body, **changes}), headers={"content-type": "application/json"}
        )
    )


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(path=st.sampled_from([p for p, _ in BASES]), value=json_values | st.binary(max_size=64))
def test_arbitrary_bodies_never_5xx(path, value):
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    check(CLIENT.post(path, content=data, headers={"content-type": "application/json"}))


def test_the_gateway_still_serves_after_the_fuzzing():
    r = CLIENT.post("/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]

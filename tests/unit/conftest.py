"""Fixtures shared by the unit tests (helpers and fakes live in tests/support/gateway_fakes.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cluster.metering import MemoryUsageSink
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.selection import load_selector
from tests.support.gateway_fakes import FakeNode, actor_handle, node_stats


@pytest.fixture()
def harness():
    nodes = {"a": FakeNode("a"), "b": FakeNode("b")}
    sink = MemoryUsageSink()
    core = GatewayCore(
        GatewayConfig(), load_selector(registry=None), nodes.__getitem__, actor_handle(sink), registry=None
    )
    core.set_nodes([node_stats("a"), node_stats("b")])
    client = TestClient(build_fastapi(lambda: core))
    client.core = core
    return client, nodes, sink

"""The scoring gauges (consensus quality, validator trust) reach the gateway's /metrics, the one target
Prometheus scrapes for meritnet, and include every one the Grafana dashboard queries."""

from __future__ import annotations

import time

import pytest

from tests.support.metrics import dashboard_metrics, live_families

pytestmark = pytest.mark.integration


def test_the_gateway_serves_the_scoring_gauges_the_dashboard_queries(cheater_network):
    from scoring.metrics import REGISTRY

    used = dashboard_metrics("meritnet_") & {m.name for m in REGISTRY.collect()}
    deadline = time.monotonic() + 60  # consensus runs every 2 s here
    while not used <= (live := live_families(f"{cheater_network.base_url}/metrics")):
        assert time.monotonic() < deadline, sorted(used - live)
        time.sleep(2)
    assert {"meritnet_node_consensus_quality", "meritnet_validator_trust"} <= used

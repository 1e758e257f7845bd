"""The package network's start check, reported once (runs first: the other modules skip if it fails).

It is also the regression test of issue 25: a fresh network's very first request is an ordinary sampled
completion of 2 tokens (LocalNetwork.check_nodes sends one to every node before the network is handed
out); on an AVX-512 Xeon exactly that request once killed every cold engine."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_every_node_answered_a_sampled_first_request(_package_network):
    from tests.support.package_network import assert_first_requests_served

    assert_first_requests_served(_package_network.get())

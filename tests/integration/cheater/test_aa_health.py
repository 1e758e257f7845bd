"""The cheater package network's start check, reported once (see tests/integration/network/test_aa_health.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_every_node_answered_a_sampled_first_request(_cheater_package_network):
    from tests.support.package_network import assert_first_requests_served

    assert_first_requests_served(_cheater_package_network.get())

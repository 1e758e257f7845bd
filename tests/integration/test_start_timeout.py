"""`meritnet up --start-timeout`: engines that are not running in time stop the start with a message that
says what to do, and everything the start began is stopped (the process exits, no Ray left behind)."""

from __future__ import annotations

import os

import pytest

from tests.support.meritnet_up import start_meritnet_up
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


def test_engines_not_ready_within_the_start_timeout_stop_the_start_with_advice(tmp_path):
    args = ["up", "--port", str(free_port()), "--start-timeout", "1"]
    proc, printed = start_meritnet_up(args, tmp_path, {**os.environ, "COLUMNS": "200"}, timeout_s=300)
    assert proc.wait(timeout=180) == 1, printed[-3000:]
    assert "did not become ready within 1s" in printed and "--start-timeout" in printed, printed[-3000:]
    assert "Press Ctrl-C to stop" not in printed

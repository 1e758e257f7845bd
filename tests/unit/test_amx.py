"""cluster/amx.py: vLLM runs our plugin in its engine processes, and it asks for AMX only where it exists."""

from __future__ import annotations

import logging

import pytest


def test_vllm_finds_the_plugin_in_its_general_plugins_group():
    from vllm.plugins import load_plugins_by_group

    from cluster.amx import request_amx

    assert load_plugins_by_group("vllm.general_plugins").get("meritnet_amx") is request_amx


@pytest.mark.parametrize(
    ("has_amx", "granted", "result", "asked", "warned"),
    [
        (False, False, True, False, False),  # AVX2 EPYC, AVX-512 without AMX: nothing to ask
        (True, True, True, True, False),  # Sapphire Rapids: asked and granted
        (True, False, False, True, True),  # refused: say so, and what to do
    ],
)
def test_it_asks_for_the_tile_state_only_on_amx_cpus(
    monkeypatch, caplog, has_amx, granted, result, asked, warned
):
    import torch

    from cluster.amx import request_amx

    calls = []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: calls.append(1) or granted)
    with caplog.at_level(logging.INFO, logger="cluster.amx"):
        assert request_amx() is result
    assert bool(calls) is asked
    assert any(r.levelno == logging.WARNING and "block_size" in r.message for r in caplog.records) is warned


def test_on_this_cpu_the_real_call_succeeds():
    from cluster.amx import request_amx

    assert request_amx() is True  # no AMX here (nothing asked), or AMX granted

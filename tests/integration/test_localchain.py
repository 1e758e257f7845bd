"""`chain_url: anvil` without Ray: the network's anvil starts in the state folder with a funded settler,
the settler deploys there, and a restart finds the same chain and binds to the same distributor."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from deploy.localchain import NetworkAnvil, anvil_chain_settings, record_contract
from settlement.actor import SettlementService
from settlement.config import SettlementConfig

pytestmark = pytest.mark.integration


def test_network_anvil_keeps_its_chain_and_distributor_across_restarts(tmp_path, monkeypatch):
    monkeypatch.delenv("MERITNET_SETTLER_KEY_FILE", raising=False)
    with pytest.raises(RuntimeError, match="no anvil runs for the state folder"):
        anvil_chain_settings(tmp_path)  # e.g. `serve deploy` with chain_url: anvil

    first = NetworkAnvil(tmp_path).start()
    key_file = tmp_path / "settler.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    settings = anvil_chain_settings(tmp_path)
    assert settings.url == first.url and settings.contract is None
    config = SettlementConfig(
        ledger_path=tmp_path / "usage.db",
        epoch_length_s=10,
        genesis=float(int(time.time()) - 25),
        claim_delay_s=0,  # two epochs settle in one pass
    )
    service = SettlementService(config, settings, key_file=str(key_file))  # the settler pays its own deploy
    record_contract(tmp_path, service.chain.address)
    assert service.tick() == [0, 1]
    first.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.post(settings.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"})  # anvil is gone
    assert json.loads((tmp_path / "anvil" / "chain.json").read_text())["url"] is None
    assert (tmp_path / "anvil" / "state.json").is_file()  # written on the way out

    again = NetworkAnvil(tmp_path).start()
    try:
        bound = anvil_chain_settings(tmp_path)
        assert bound.contract == service.chain.address and bound.url == again.url
        restarted = SettlementService(config, bound, key_file=str(key_file))
        assert restarted.chain.address == service.chain.address and restarted.chain.next_epoch() == 2
    finally:
        again.stop()

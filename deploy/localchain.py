"""`meritnet up --chain anvil` (`chain_url: anvil`): the network settles on a local anvil node of its own.

`meritnet up` starts it before Ray (so no Ray process can take its port), on 127.0.0.1 and a free port,
and stops it with the network. The chain lives in the state folder (`anvil/state.json`, anvil's
`--state`: loaded at start, written at a clean stop), so a restarted network finds its distributor,
settled epochs and claims again. The settler key is MERITNET_SETTLER_KEY_FILE, else the state folder's
dev key (`settler.key`, mode 0600, as on the embedded chain), funded from anvil. `anvil/chain.json`
tells the settlement actor where the node is (`url`) and, once it has deployed one, which distributor
to bind to (`contract`); `meritnet settlement verify/claim --url --contract` audit against the same two.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.errors import NetworkStartError
from settlement.anvil import Anvil
from settlement.keys import KEY_FILE_ENV, SettlerKey

if TYPE_CHECKING:  # web3 is imported where used: deploy/network.py imports this module
    from settlement.chain_settings import ChainSettings

ANVIL = "anvil"  # the chain_url value
SETTLER_FUNDS_WEI = 10**21  # a settle costs ~67k gas: a lifetime of epochs on a local chain
_INFO = "chain.json"


def settler_key_file(state_dir: Path) -> Path:
    """$MERITNET_SETTLER_KEY_FILE, else the state folder's dev key (created once, mode 0600)."""
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV])
    path = state_dir / "settler.key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(SettlerKey.generate().export_hex())
    return path


def _info_path(state_dir: Path) -> Path:
    return state_dir / ANVIL / _INFO


def _read_info(state_dir: Path) -> dict:
    path = _info_path(state_dir)
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_info(state_dir: Path, **fields) -> None:
    path = _info_path(state_dir)
    path.write_text(json.dumps({**_read_info(state_dir), **fields}))


class NetworkAnvil:
    """The network's anvil: start() before Ray, stop() after it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.node: Anvil | None = None

    @property
    def url(self) -> str:
        return self.node.url if self.node else ""

    def start(self) -> NetworkAnvil:
        folder = self.state_dir / ANVIL
        folder.mkdir(parents=True, exist_ok=True)
        try:
            key = SettlerKey.from_file(settler_key_file(self.state_dir))
            self.node = Anvil(state_file=folder / "state.json", log_file=folder / "anvil.log").start()
        except (OSError, RuntimeError, ValueError) as exc:  # no anvil binary, a bad key file, a failed start
            raise NetworkStartError(f"the local anvil chain did not start: {exc}") from None
        balance = int(self.node.rpc("eth_getBalance", [key.address, "latest"]), 16)
        if balance < SETTLER_FUNDS_WEI:
            self.node.rpc("anvil_setBalance", [key.address, hex(SETTLER_FUNDS_WEI)])
        _write_info(self.state_dir, url=self.node.url)
        atexit.register(self.stop)  # also when `meritnet up` ends by an unexpected error
        return self

    def stop(self) -> None:
        """Stop anvil (it writes its state on the way out)."""
        if self.node is not None:
            self.node.stop()
            self.node = None
            _write_info(self.state_dir, url=None)


def anvil_chain_settings(state_dir: Path) -> ChainSettings:
    """The settlement actor's chain: the running anvil, bound to the distributor an earlier start
    deployed if the chain still holds it (a chain that was not stopped cleanly may have lost it)."""
    from settlement.chain import Chain
    from settlement.chain_settings import ChainSettings

    info = _read_info(state_dir)
    if not info.get("url"):
        raise RuntimeError(
            f"chain_url 'anvil': no anvil runs for the state folder {state_dir}; `meritnet up` starts one "
            "(`serve deploy` does not): start it that way, or set chain_url to a JSON-RPC URL"
        )
    contract = info.get("contract")
    if contract and not Chain.connect(ChainSettings(url=info["url"], contract=contract)).has_code():
        contract = None
    return ChainSettings(url=info["url"], contract=contract)


def record_contract(state_dir: Path, address: str) -> None:
    """Remember the distributor, so the next start binds to it instead of deploying another."""
    _write_info(state_dir, contract=address)

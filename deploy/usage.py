"""The usage store: a Ray actor that makes gateways' usage records durable in settlement's ledger.

Group commit: records from concurrent requests that arrive while a write is in progress are
written together in the next transaction, so one fsync serves many requests and a gateway's
`await record(...)` returns only once its record is on disk.

It also enforces key budgets (routing/budgets.py) from that same ledger, never from a second counter:
a request of a key with a budget holds its worst case (`reserve`) until its record is written (the
ledger then has what it was charged) or it is released. A reservation is admitted only if the key's
spend in the window, plus every reservation held, plus it, stays within the budget. The spend is read
from the ledger on the event loop (a lock-free WAL read, `UsageLedger.key_spent`), so no record's write
and release can fall between the read and the check (a record written but not yet released counts twice
for a moment: never too little). Holds are kept in memory and written beside the ledger
(settlement/holds.py): a restarted store reloads those of requests still running.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

from cluster import services
from cluster.local import HEAD_NODE
from cluster.records import UsageRecord
from settlement.holds import Hold, HoldBook

USAGE_STORE_NAME = services.USAGE_STORE


class UsageStore:
    def __init__(self, path: str, epoch_length_s: float, genesis: float = 0.0) -> None:
        from settlement import UsageLedger

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._ledger = UsageLedger(path, epoch_length_s=epoch_length_s, genesis=genesis)
        self._pending: list[tuple[list[UsageRecord], asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        # request id -> its key budget reservation, also on disk: reloaded after a restart
        self._book = HoldBook(Path(path).with_name(Path(path).name + ".holds"))
        self._holds: dict[str, Hold] = self._book.load(
            time.time(), lambda rid: self._ledger.find(rid) is not None
        )

    async def record(self, records: Sequence[UsageRecord]) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(records), fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            flat = [r for recs, _ in batch for r in recs]
            try:
                await asyncio.to_thread(self._ledger.append, flat)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            # charged now: the ledger has them (most records held nothing: no write for those)
            self._book.drop([r.request_id for r in flat if self._holds.pop(r.request_id, None) is not None])
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def reserve(
        self, key_id: str, request_id: str, tokens: int, budget: int, since: float, ttl_s: float
    ) -> int:
        """Hold `tokens` of `key_id`'s budget for `request_id` if they fit: the key's spend since `since`
        plus held reservations plus `tokens` within `budget`. Returns that total when held, or -1 - the
        total without this request when refused. A hold ends when the request's record is written,
        on `release`, or after `ttl_s` (its gateway died). No await: one piece on the actor's loop."""
        now = time.time()
        expired = [rid for rid, h in self._holds.items() if h.expires_at < now]
        for rid in expired:
            del self._holds[rid]
        self._book.drop(expired)
        held = sum(h.tokens for h in self._holds.values() if h.key_id == key_id)
        used = self._ledger.key_spent(key_id, since) + held
        if used + tokens > budget:
            return -1 - used
        self._holds[request_id] = hold = Hold(key_id, tokens, now + ttl_s)
        self._book.put(request_id, hold)
        return used + tokens

    async def release(self, request_id: str) -> None:
        """`request_id` ended without a record (refused, no node answered, the client left early)."""
        if self._holds.pop(request_id, None) is not None:
            self._book.drop((request_id,))

    async def all(self, epoch: int | None = None) -> list[UsageRecord]:
        """Records of one epoch, or of the whole ledger (audits, tests), read from disk: a store that
        was restarted returns what its predecessor wrote too."""
        return await asyncio.to_thread(self._all, epoch)

    def _all(self, epoch: int | None) -> list[UsageRecord]:
        epochs = [epoch] if epoch is not None else self._ledger.epochs_with_records()
        return [r for e in epochs for r in self._ledger.records(e)]


def start_usage_store(path: Path, epoch_length_s: float, genesis: float):
    import ray

    return (
        ray.remote(UsageStore)
        .options(
            name=USAGE_STORE_NAME,
            namespace=services.NAMESPACE,
            get_if_exists=True,
            lifetime="detached",  # outlives the process that started it (serve deploy, KubeRay)
            num_cpus=0,
            max_concurrency=1000,
            max_restarts=-1,  # the ledger is durable: a restarted store reopens it, nothing acknowledged is lost
            resources=HEAD_NODE,  # the ledger file is on the head node; so is every control-plane actor
        )
        .remote(str(path), epoch_length_s, genesis)
    )


SETTLEMENT_NAME = services.SETTLEMENT
VALIDATOR_KEYS_DIR = "validator-keys"  # in the state folder: one signing key per validator


def settlement_default_quality(cfg) -> float:
    """Quality of a node no consensus round scored in an epoch: 0 with validators, 1.0 without."""
    return 0.0 if cfg.validators else 1.0


def settlement_config(cfg, ledger_path: Path, genesis: float):
    """The settler's config from the network's: its ledger, epochs, quality rule, validators' share and
    stakes (by the address each validator signs with: the key in the state folder)."""
    from deploy.scoring import validator_keys
    from settlement.config import SettlementConfig

    keys = validator_keys(cfg.validators, cfg.state_dir / VALIDATOR_KEYS_DIR) if cfg.validators else {}

    # With validators an unscored node is on probation (quality 0) until its first consensus score;
    # without them (the demo) nothing scores nodes, so every node is paid at quality 1.0. Not None
    # (wait for scores): an epoch no consensus round reached would then stop settlement for good.
    return SettlementConfig(
        ledger_path=ledger_path,
        epoch_length_s=cfg.epoch_length_s,
        genesis=genesis,
        default_quality=settlement_default_quality(cfg),
        validator_stakes={keys[v.validator_id].address: v.stake for v in cfg.validators or ()},
        public_rpc_url=cfg.public_rpc_url,
        **({} if cfg.validator_share_bps is None else {"validator_share_bps": cfg.validator_share_bps}),
    )


def settler_key_path(cfg) -> Path:
    """$MERITNET_SETTLER_KEY_FILE; on the embedded or anvil chain, else the state folder's dev key
    (generated once, mode 0600: fine for a local chain, never for a real one)."""
    from deploy.localchain import settler_key_file
    from settlement.keys import KEY_FILE_ENV

    if not os.environ.get(KEY_FILE_ENV) and cfg.chain_url not in ("embedded", "anvil"):
        raise RuntimeError(
            f"set {KEY_FILE_ENV} to a file (chmod 600) holding the settler key to settle on a real chain"
        )
    return settler_key_file(cfg.state_dir)


def settlement_chain(cfg):
    """The chain settlement binds to: the configured URL (and $MERITNET_CHAIN_CONTRACT), or the
    network's own anvil and the distributor an earlier start deployed there."""
    from settlement.chain_settings import ChainSettings

    if cfg.chain_url == "anvil":  # the network's own anvil (deploy/localchain.py), started before Ray
        from deploy.localchain import anvil_chain_settings

        return anvil_chain_settings(cfg.state_dir)
    return ChainSettings(url=cfg.chain_url)


def start_settlement(cfg, ledger_path: Path, genesis: float, signer_socket: Path | None = None):
    """The settlement actor on the network's ledger, signing through the signer at `signer_socket`
    (deploy/signer.py); without one it loads the settler key itself (`settler_key_path`)."""
    import functools

    import ray

    from deploy.localchain import record_contract
    from deploy.signer import SETTLER, RemoteSigner
    from settlement.actor import settlement_actor

    key_file = None if signer_socket else str(settler_key_path(cfg))
    signer = functools.partial(RemoteSigner, str(signer_socket), SETTLER) if signer_socket else None
    chain = settlement_chain(cfg)
    settle_cfg = settlement_config(cfg, ledger_path, genesis)
    if settle_cfg.public_rpc_url is None and cfg.chain_url == "anvil":  # the network's own, on loopback
        settle_cfg = settle_cfg.model_copy(update={"public_rpc_url": chain.url})
    actor = (
        settlement_actor()
        .options(
            name=SETTLEMENT_NAME,
            namespace=services.NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            resources=HEAD_NODE,
        )
        .remote(settle_cfg, chain, None, key_file, signer)
    )
    status = ray.get(actor.status.remote(), timeout=120)  # surfaces a failed start (bad key, chain down) now
    if cfg.chain_url == "anvil":
        record_contract(cfg.state_dir, status["contract"])
    return actor

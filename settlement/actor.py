"""The settlement actor: `SettlementService` builds a `Settler` (settlement.settler) from paths and
settings inside whatever process runs it (the settler key is loaded there, never shipped), and answers
the control plane: consensus submits quality and reads stakes, the gateway asks for status, rewards,
proofs, receipts and metrics. `settlement_actor()` wraps it in a Ray actor for deploy/.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from settlement import metrics
from settlement.chain import Chain, ChainUnavailable
from settlement.chain_settings import EMBEDDED, ChainSettings
from settlement.config import SettlementConfig
from settlement.keys import SettlerKey, Signer
from settlement.rewardbook import RewardBook
from settlement.settler import Settler

log = logging.getLogger(__name__)


class SettlementService:
    """Builds a Settler inside the process that runs it (the key is loaded here or held by a signer
    outside Ray; it is never shipped)."""

    def __init__(
        self,
        config: SettlementConfig | None = None,
        chain: ChainSettings | None = None,
        quality: Mapping[int, Mapping[str, float]] | None = None,
        key_file: str | None = None,
        signer: Callable[[], Signer] | None = None,
    ) -> None:
        from settlement.ledger import UsageLedger

        config = config or SettlementConfig()
        self.ledger = UsageLedger(config.ledger_path, config.epoch_length_s, genesis=config.genesis)
        self.chain = Chain.connect(chain or ChainSettings())
        # `signer`: what `meritnet up` passes, a handle on the key held outside Ray (deploy/signer.py);
        # else the key is loaded here, for a settler run as a process of its own
        self.key = signer() if signer is not None else SettlerKey.load(Path(key_file) if key_file else None)
        if self.chain.settings.url == EMBEDDED:
            self.chain.fund(self.key.address, 10**21)  # the embedded chain's dev account pays for gas
        self.book = RewardBook(config.book_path)
        self._usage_trees: dict[int, Any] = {}  # epoch -> usage tree, for receipts
        self.settler = Settler(self.ledger, self.chain, self.key, self.book, config, quality)
        self.settler.ensure_contract()

    def submit_quality(
        self, epoch: int, quality: Mapping[str, float], dividends: Mapping[str, float] | None = None
    ) -> None:
        """Consensus scores for an epoch (scoring -> deploy -> here): node quality and validator
        dividends by address; ignored once the epoch is committed (see Settler.submit_quality)."""
        self.settler.submit_quality(epoch, quality, dividends)

    def validator_stakes(self, addresses: Sequence[str]) -> dict[str, int]:
        """The on-chain stake record for these validator addresses (what consensus weighs them by)."""
        return self.settler.validator_stakes(addresses)

    def tick(self) -> list[int]:
        try:
            return self.settler.tick()
        except ChainUnavailable as exc:
            log.warning("chain unavailable, epochs stay queued: %s", exc)
            return []

    def status(self) -> dict[str, Any]:
        latest = self.book.latest()
        return {
            "contract": self.chain.address,
            "chain_id": self.chain.chain_id,
            "settler": self.key.address,
            "last_closed_epoch": self.ledger.last_closed_epoch(),
            "last_committed_epoch": None if latest is None else latest.epoch,
        }

    def rewards_of(self, operator: str) -> dict[str, Any]:
        """What an operator has earned: cumulative wei through the last committed epoch (what they can
        claim with a Merkle proof from `meritnet settlement prove --operator`), and where to claim it."""
        latest = self.book.latest()
        return {
            "operator": operator,
            "last_committed_epoch": None if latest is None else latest.epoch,
            "cumulative_wei": str(latest.cumulative.get(operator, 0)) if latest else "0",
            "contract": self.chain.address,
            "chain_id": self.chain.chain_id,
        }

    def reward_proof_of(self, account: str) -> dict[str, Any]:
        """GET /v1/operators/{account}/proof: the account's cumulative reward leaf and proof under the root
        claims verify against now (settlement/proofs.py), or {"error": why}. A later root still in its
        veto window is named (`pending_epoch`, `claimable_at`) but not proven: no claim could use it yet."""
        from settlement.proofs import settled_reward_proof

        window = self.chain.root_window()
        last = self.ledger.last_settled_epoch()
        claimable = None if last is None else min(last, window.claimable_epoch)
        doc = settled_reward_proof(
            self.book,
            claimable if claimable is not None and claimable >= 0 else None,
            account,
            contract=self.chain.address,
            chain_id=self.chain.chain_id,
            rpc_url=self.settler.config.public_rpc_url,
        )
        if window.pending:
            doc |= {"pending_epoch": window.latest_epoch, "claimable_at": window.claimable_at}
        return doc

    def receipt_of(self, request_id: str) -> dict[str, Any]:
        """GET /v1/receipts/{request_id}: the request's usage leaf and proof once its epoch is settled
        on-chain (settlement/proofs.py `usage_receipt`), where it stands before, or {"error": why}."""
        from settlement.proofs import usage_receipt

        if len(self._usage_trees) > 4:  # the last few settled epochs' trees: receipts come in bursts
            self._usage_trees.pop(min(self._usage_trees))
        return usage_receipt(
            self.ledger,
            request_id,
            contract=self.chain.address,
            chain_id=self.chain.chain_id,
            trees=self._usage_trees,
        )

    def recent_epochs(self, count: int = 10) -> list[dict[str, Any]]:
        """The last `count` settled epochs, newest first: the transaction that settled each, its rewards
        per operator and per validator address (wei, as decimal strings: JSON numbers lose precision
        past 2**53)."""
        last = self.ledger.last_settled_epoch()
        out: list[dict[str, Any]] = []
        for epoch in range(last if last is not None else -1, -1, -1):
            if len(out) >= count:
                break
            tx = self.ledger.settled(epoch)
            if tx is None:
                continue
            c = self.book.get(epoch)
            per_operator = c.operator_rewards if c else {}
            validators = c.validator_rewards if c else {}
            out.append(
                {
                    "epoch": epoch,
                    "tx": tx,
                    "rewards": {op: str(w) for op, w in per_operator.items()},
                    "validator_rewards": {v: str(w) for v, w in validators.items()},
                }
            )
        return out

    def metrics_text(self) -> str:
        """The settler's metrics (settlement.metrics) in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(metrics.REGISTRY).decode()

    def run(self) -> None:
        self.settler.run()


def settlement_actor(**actor_options: Any):
    """The Ray actor class (imported lazily so the logic above never needs Ray).

    Usage from deploy/: `settlement_actor().options(name="settlement").remote(SettlementConfig(...),
    ChainSettings(...))`,
    then `actor.tick.remote()` on a timer (or `actor.run.remote()` to loop inside the actor).
    """
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, **actor_options)(SettlementService)

"""The settler: each epoch, freeze -> rewards -> roots -> one signed tx -> receipt -> record.

`Settler` holds the logic and runs without Ray (unit tests drive it with the embedded chain); the
on-chain half of an epoch (sign, write ahead, broadcast, receipt, reprice, adopt) is
`settlement.settle_tx.SettleTx`; `settlement.actor` runs a Settler inside the settlement actor.

Crash safety, step by step (each step is durable before the next starts):
  freeze   ledger.close_epoch(e) freezes the epoch's records.
  roots    the quality and dividends used, then in one transaction the commitment: both roots, the
           epoch's wei per operator and per validator, and every address's cumulative amount
           (RewardBook, the one owner of reward state); a restart reuses it. Scores submitted once
           the commitment is stored are ignored (submit_quality), so late scores never change it.
  sign, written, broadcast / receipt   settlement.settle_tx.
Later epochs never wait behind a stuck one: every pass first commits each closed epoch in order
(computing needs only the previous commitment, not its settlement), then settles in order. The
contract accepts only settle(next_epoch), so an epoch stuck on-chain (a pending tx, the chain's
clock, a revert, the chain down) holds the *settlement* of later ones, whose rewards are already
computed and stored and go out one per pass as soon as it is through. An epoch waiting for its
consensus scores (default_quality None) is committed after max_score_wait_epochs later epochs
have closed, unscored nodes at weight 0; meanwhile it holds the commitment of later ones (their
carried wei depends on it). Each of these states sets meritnet_settlement_stuck{state=...} and logs.

Validators are paid: consensus submits each epoch's validator dividends (Yuma's bond-weighted
incentive, by the address that signs a validator's reports) with its quality. Of an epoch's budget,
validator_share_bps / 10,000 (floored) goes to validators by dividend and the rest to operators by
usage x quality (settlement.rewards); an epoch without dividends pays operators all of it. Both kinds
of account are leaves of the same reward tree, claimed the same way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from settlement import metrics
from settlement.chain import ChainUnavailable, ContractReverted
from settlement.config import SettlementConfig, stake_units
from settlement.interfaces import RewardFunction, RewardStore, SettlementChain, SettlementLedger
from settlement.keys import Signer
from settlement.rewardbook import EpochCommitment
from settlement.rewards import epoch_quality, split_by_weight, validator_pool
from settlement.settle_tx import SettlementConflict, SettleTx, crash, mark_stuck

log = logging.getLogger(__name__)

ZERO_ROOT = b"\x00" * 32

QualitySource = Callable[[int], Mapping[str, float] | None] | Mapping[int, Mapping[str, float]]


def _clean(scores: Mapping[str, float], what: str, epoch: int, upper: float | None) -> dict[str, float]:
    """The entries that are a finite number in [0, upper] under a string key; the rest are logged."""
    out: dict[str, float] = {}
    for key, value in dict(scores).items():
        ok = isinstance(key, str) and isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and value >= 0 and (upper is None or value <= upper)
        if ok:
            out[key] = float(value)
        else:
            log.warning("epoch %d: dropped a %s entry that is not a number in range", epoch, what)
    return out


def _clean_dividends(dividends: Mapping[str, float], epoch: int) -> dict[str, float]:
    """Dividends keyed by checksummed address (a key that is not an address is dropped, logged)."""
    from eth_utils import is_address, to_checksum_address

    out: dict[str, float] = {}
    for key, value in _clean(dividends, "dividend", epoch, upper=None).items():
        if is_address(key):
            out[to_checksum_address(key)] = out.get(to_checksum_address(key), 0.0) + value
        else:
            log.warning("epoch %d: dropped a dividend whose key is not an address", epoch)
    return out


def _bytes32(root: Any) -> bytes:
    if isinstance(root, str):
        root = bytes.fromhex(root.removeprefix("0x"))
    return bytes(root)


class Settler:
    """Closes due epochs and settles them on-chain in order, exactly once each."""

    def __init__(
        self,
        ledger: SettlementLedger,
        chain: SettlementChain,
        key: Signer,
        book: RewardStore,
        config: SettlementConfig | None = None,
        quality: QualitySource | None = None,
        clock: Callable[[], float] = time.time,
        rewards: RewardFunction | None = None,
    ) -> None:
        self.ledger = ledger
        self.chain = chain
        self.key = key
        self.book = book
        self.config = config or SettlementConfig()
        self._quality = quality
        self.clock = clock
        self._rewards = rewards  # settlement.rewards.compute_rewards unless a test injects one
        self._emission_cap: int | None = None  # the contract's, read once (it is immutable)
        self.epochs = self.config.epochs
        self.tx = SettleTx(ledger, chain, key)  # the on-chain half: sign, broadcast, receipt, adopt

    # -- scheduling -----------------------------------------------------------------------------

    def due_epoch(self) -> int:
        """The last epoch that has fully ended by now (-1 if none)."""
        return self.epochs.last_ended(self.clock())

    def close_due_epochs(self) -> list[int]:
        """Freeze every epoch that has ended and is not closed yet, oldest first."""
        last = self.ledger.last_closed_epoch()
        start = 0 if last is None else last + 1  # the ledger closes epochs strictly in order from 0
        closed = []
        for epoch in range(start, self.due_epoch() + 1):
            self.ledger.close_epoch(epoch)
            crash("freeze")
            closed.append(epoch)
        return closed

    def ensure_contract(self) -> str:
        """Bind to the configured distributor, or deploy one starting at the first unsettled epoch.
        A bound distributor must time the same epochs as the ledger (SettlementConflict if not)."""
        genesis, length = self.epochs.onchain()
        if self.chain.address is None:
            first = self._first_unsettled()
            cap = self.config.emission_cap
            delay = self.config.claim_delay
            self.chain.deploy(
                self.key,
                first,
                cap,
                self.chain.settings.admin,
                genesis=genesis,
                epoch_length=length,
                claim_delay=delay,
            )
            log.info(
                "deployed the distributor at %s (first epoch %d, emission cap %d wei, admin %s, "
                "genesis %d, epochs of %d s, reward roots claimable %d s after their settle)",
                self.chain.address,
                first,
                cap,
                self.chain.admin(),
                genesis,
                length,
                delay,
            )
            self._record_stakes()
        elif (bound := self.chain.epochs()) != (genesis, length):
            raise SettlementConflict(
                f"the distributor at {self.chain.address} times epochs as (genesis, length) = "
                f"{bound}, but this ledger uses {(genesis, length)}: its epoch numbers "
                "would mean other hours; set MERITNET_SETTLEMENT_GENESIS/EPOCH_LENGTH_S to the "
                "distributor's, or deploy a new one"
            )
        return self.chain.address

    def _record_stakes(self) -> None:
        """Write the configured validator stakes on the distributor just deployed, if this key is its
        admin (with another admin, e.g. a multisig, the admin records them)."""
        stakes = self.config.validator_stakes
        if not stakes:
            return
        if self.chain.admin() != self.key.address:
            log.warning(
                "the distributor's admin is %s, not the settler: validator stakes are not recorded; the "
                "admin records them with `meritnet settlement set-stake`",
                self.chain.admin(),
            )
            return
        for address, stake in sorted(stakes.items()):
            self.chain.transact(self.key, "set_stake", address, stake_units(stake))

    def validator_stakes(self, addresses: Sequence[str]) -> dict[str, int]:
        """The stakes the distributor records for these validator addresses (0: none)."""
        return {a: self.chain.stake(a) for a in addresses}

    def emission_cap(self) -> int:
        """The most one epoch may pay: the contract's cap, read on first use (it is immutable)."""
        if self._emission_cap is None:
            self._emission_cap = self.chain.emission_cap()
            if self._emission_cap < self.config.emission_wei:
                log.error(
                    "the distributor at %s caps an epoch at %d wei, below the configured emission of "
                    "%d wei: the difference carries forward every epoch and is never paid",
                    self.chain.address,
                    self._emission_cap,
                    self.config.emission_wei,
                )
        return self._emission_cap

    def tick(self) -> list[int]:
        """One pass: close due epochs, then settle closed ones in order. Returns epochs settled now."""
        self.close_due_epochs()
        try:
            return self.settle_closed()
        except ChainUnavailable:
            metrics.CHAIN_ERRORS.labels("unavailable").inc()
            mark_stuck("chain_unavailable")
            raise
        except ContractReverted:
            metrics.CHAIN_ERRORS.labels("reverted").inc()
            mark_stuck("error")
            raise
        except RuntimeError:
            metrics.CHAIN_ERRORS.labels("error").inc()
            mark_stuck("error")
            raise
        finally:
            self._report()

    def settle_closed(self) -> list[int]:
        last = self.ledger.last_closed_epoch()
        if last is None:
            return []
        first = self._first_unsettled()
        mark_stuck(None)
        for epoch in range(first, last + 1):  # commit ahead: computing waits on no settlement
            if self.commitment(epoch) is None:
                break  # waiting for scores: later epochs' carried wei depends on this one
        done = []
        for epoch in range(first, last + 1):
            if not self._settle_epoch(epoch):
                break  # keep order: the contract takes settle(next_epoch) only
            done.append(epoch)
        return done

    def _report(self) -> None:
        """Metrics of the epochs that wait (each wait is logged where it is detected)."""
        settled = self.ledger.last_settled_epoch()
        closed = self.ledger.last_closed_epoch()
        latest = self.book.latest()
        metrics.LAST_SETTLED_EPOCH.set(-1 if settled is None else settled)
        metrics.LAST_COMMITTED_EPOCH.set(-1 if latest is None else latest.epoch)
        metrics.EPOCHS_WAITING.set((-1 if closed is None else closed) - (-1 if settled is None else settled))
        if self.ledger.pending_tx(self._first_unsettled()) is None:
            metrics.PENDING_TX_AGE_BLOCKS.set(0)

    def _first_unsettled(self) -> int:
        # Epochs settle strictly in order, so everything after the last settled one is open.
        last = self.ledger.last_settled_epoch()
        return 0 if last is None else last + 1

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Tick forever (until `stop()`); a chain outage only delays, it never drops an epoch."""
        self.ensure_contract()
        while not stop():
            try:
                self.tick()
            except ChainUnavailable as exc:
                log.warning("chain unavailable, epochs stay queued: %s", exc)
            except SettlementConflict:
                raise  # foreign roots on-chain: retrying cannot fix it
            except (RuntimeError, ContractReverted) as exc:
                # e.g. a reverted settle tx: its pending entry is cleared and the next pass re-signs.
                log.error("settlement pass failed, retrying in %.0fs: %s", self.config.tick_s, exc)
            time.sleep(self.config.tick_s)

    # -- one epoch ------------------------------------------------------------------------------

    def quality_for(self, epoch: int) -> dict[str, float] | None:
        stored = self.book.quality(epoch)
        if stored is not None:
            return stored
        if callable(self._quality):
            scores = self._quality(epoch)
        elif self._quality is not None:
            scores = self._quality.get(epoch)
        else:
            scores = None
        return None if scores is None else dict(scores)

    def quality_frozen(self, epoch: int) -> bool:
        """Whether the epoch's scores are final: its commitment is stored."""
        return self.book.get(epoch) is not None

    def submit_quality(
        self, epoch: int, quality: Mapping[str, float], dividends: Mapping[str, float] | None = None
    ) -> bool:
        """Consensus scores for an epoch: node quality and, with validators, their dividends by
        address; ignored (False) once the epoch is committed. Entries that are not a finite number
        in range (or, for dividends, not an address) are dropped and logged, never raised: nothing
        consensus passes on may stop settlement."""
        if self.quality_frozen(epoch):
            log.info("epoch %d: late quality scores ignored, its rewards are already stored", epoch)
            return False
        self.book.put_quality(epoch, _clean(quality, "quality", epoch, upper=1.0))
        if dividends is not None:
            self.book.put_dividends(epoch, _clean_dividends(dividends, epoch))
        return True

    def commitment(self, epoch: int) -> EpochCommitment | None:
        """The epoch's committed rewards and roots, computing and storing them the first time."""
        existing = self.book.get(epoch)
        if existing is not None:
            return existing
        from settlement.trees import EmptyTreeError, usage_tree
        from settlement.trees import reward_root as reward_root_of

        usage = self.ledger.usage_by_node(epoch)
        scores = self.quality_for(epoch)
        if scores is None and self.config.default_quality is None:
            closed = self.ledger.last_closed_epoch()
            if closed is None or closed - epoch < self.config.max_score_wait_epochs:
                mark_stuck("scores")
                log.info("epoch %d: waiting for its consensus scores before committing it", epoch)
                return None
            log.warning(
                "epoch %d: no consensus scores after %d later epochs closed; committing it with "
                "unscored nodes at weight 0",
                epoch,
                closed - epoch,
            )
        quality = epoch_quality(usage, scores, self.config.default_quality)
        self.book.put_quality(epoch, quality)  # before computing: a restart recomputes the same numbers
        dividends = self.book.dividends(epoch) or {}
        previous = self.book.get(epoch - 1)
        available = self.config.emission_wei + (previous.carried_wei if previous else 0)
        # The contract refuses an epoch above its cap: pay up to the cap, carry the rest on.
        budget = min(available, self.emission_cap())
        to_validators = validator_pool(budget, self.config.validator_share_bps, dividends)
        if self._rewards is None:
            from settlement.rewards import compute_rewards

            self._rewards = compute_rewards
        result = self._rewards(
            usage, quality, budget - to_validators, self.config.prompt_weight, self.config.completion_weight
        )
        per_validator = split_by_weight(dividends, to_validators)
        carried_wei = result.carried_wei + available - budget
        cumulative = dict(previous.cumulative) if previous else {}
        by_lower = {account.lower(): account for account in cumulative}
        for account, amount in [*result.per_operator.items(), *per_validator.items()]:
            key = by_lower.setdefault(account.lower(), account)  # one leaf per address, any case
            cumulative[key] = cumulative.get(key, 0) + amount
        frozen = self.ledger.frozen_epoch(epoch)
        try:
            tree = usage_tree(frozen)
            usage_root, interactions = _bytes32(tree.root), len(tree)
        except EmptyTreeError:
            usage_root, interactions = ZERO_ROOT, 0
        reward_root = _bytes32(reward_root_of(cumulative))
        stored = self.book.put(
            EpochCommitment(
                epoch=epoch,
                usage_root=usage_root,
                reward_root=reward_root,
                interactions=interactions,
                epoch_reward=sum(result.per_operator.values()) + sum(per_validator.values()),
                carried_wei=carried_wei,
                cumulative=cumulative,
                operator_rewards=dict(result.per_operator),
                validator_rewards=per_validator,
            )
        )
        log.info(
            "epoch %d committed: %d wei to %d operator(s), %d wei to %d validator(s), %d wei carried",
            epoch,
            sum(result.per_operator.values()),
            len(result.per_operator),
            sum(per_validator.values()),
            len(per_validator),
            carried_wei,
        )
        crash("roots")
        return stored

    def _settle_epoch(self, epoch: int) -> bool:
        """Drive one epoch to 'settled'. True when it is settled; False to retry on a later pass."""
        c = self.book.get(epoch)  # committed by settle_closed's first loop, or still waiting for scores
        if c is None:
            return False
        return self.tx.settle(c)

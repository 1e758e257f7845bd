"""The settlement actor: each epoch, freeze -> rewards -> roots -> one signed tx -> receipt -> record.

`Settler` holds the logic and runs without Ray (unit tests drive it with the embedded chain);
`SettlementService` builds one from paths and settings inside whatever process runs it, and
`settlement_actor()` wraps that in a Ray actor for deploy/.

Crash safety, step by step (each step is durable before the next starts):
  freeze   ledger.close_epoch(e) freezes the epoch's records.
  roots    the quality and dividends used, then in one transaction the commitment: both roots, the
           epoch's wei per operator and per validator, and every address's cumulative amount
           (RewardBook, the one owner of reward state); a restart reuses it. Scores submitted once
           the commitment is stored are ignored (submit_quality), so late scores never change it.
  sign     the settle tx is signed at the settler's next nonce.
  written  the raw bytes are written ahead (ledger.put_pending_tx) BEFORE broadcast.
  broadcast / receipt   sent; the receipt is awaited; ledger.mark_settled(e, tx_hash).
The contract also refuses an epoch before the chain's clock has passed its end (EpochNotEnded, see
cluster.epochs); the ledger closes an epoch no earlier, so that refusal only means the chain's
clock lags this process's: the epoch waits for the next pass.
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
usage x quality (settlement.rewards); an epoch without dividends pays operators only. Both kinds of
account are leaves of the same reward tree, claimed the same way.

On every pass `_settle_epoch` first asks the chain: the contract's next_epoch > e means e is on-chain
(mark it, whichever tx did it); a written-ahead tx that is pending is rebroadcast byte for byte, and
replaced at the same nonce with bumped fees (never above max_fee_cap_wei) once it has been pending
for reprice_after_blocks; one the node no longer knows (dropped) is re-signed at the same nonce with
bumped fees. The contract
accepts each epoch once (epoch == next_epoch), so nothing is ever paid twice. A chain that does not
answer raises ChainUnavailable: the epochs stay queued and settle in order once it is back.

Fault injection for the tests: MERITNET_CRASH_AT=<step> SIGKILLs this process the first time it
reaches that step (freeze, roots, sign, written, broadcast, receipt).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.epochs import Epochs
from settlement import metrics
from settlement.chain import (
    EMBEDDED,
    Chain,
    ChainSettings,
    ChainUnavailable,
    ContractReverted,
    Fees,
    fees_of_raw,
)
from settlement.interfaces import RewardFunction, RewardStore, SettlementChain, SettlementLedger
from settlement.keys import SettlerKey
from settlement.rewardbook import EpochCommitment, RewardBook, book_path_of
from settlement.rewards import BPS, epoch_quality, split_by_weight, validator_pool

log = logging.getLogger(__name__)

CRASH_ENV = "MERITNET_CRASH_AT"
CRASH_STEPS = ("freeze", "roots", "sign", "written", "broadcast", "receipt")
# Default emission cap = this x emission_wei: an epoch after one with no eligible usage pays both
# epochs' emission at once; longer carries drain at one extra emission per epoch (see commitment()).
EMISSION_CAP_HEADROOM = 2
ZERO_ROOT = b"\x00" * 32

QualitySource = Callable[[int], Mapping[str, float] | None] | Mapping[int, Mapping[str, float]]


class SettlementConfig(BaseSettings):
    """How epochs are kept and paid (env: MERITNET_SETTLEMENT_<FIELD>)."""

    model_config = SettingsConfigDict(env_prefix="MERITNET_SETTLEMENT_", extra="ignore")

    ledger_path: Path = Field(
        default=Path("meritnet-ledger.sqlite"), description="The usage ledger (SQLite)."
    )
    epoch_length_s: float = Field(
        default=3600.0,
        gt=0,
        description="Length of one epoch in seconds: a whole number (>= 1), since the distributor times "
        "epochs with block timestamps (whole seconds).",
    )
    genesis: float = Field(
        default=0.0,
        description="Unix time at which epoch 0 starts; a distributor the settler deploys gets it floored "
        "to a whole second (its epochs then end at or before the ledger's).",
    )
    emission_wei: int = Field(default=10**21, ge=0, description="Reward minted per epoch (wei, 18 decimals).")
    emission_cap_wei: int | None = Field(
        default=None,
        ge=0,
        description="The most one epoch may pay (wei), fixed in a distributor the settler deploys (the "
        f"contract refuses more). None: {EMISSION_CAP_HEADROOM} x emission_wei. A bound distributor "
        "(MERITNET_CHAIN_CONTRACT) keeps the cap it was deployed with.",
    )
    claim_delay_s: int | None = Field(
        default=None,
        ge=0,
        description="Seconds each reward root stays pending on a distributor the settler deploys: the "
        "admin may veto it (a leaked settler key's root) and claims wait for it. None: half the epoch "
        "length (30 min for the default 1 h epochs; 30 s for the demo's 60 s), so the window closes "
        "before the next epoch settles. Must be shorter than an epoch. A bound distributor keeps its own.",
    )
    prompt_weight: int = Field(default=1, ge=0, description="Usage weight of one prompt token (integer).")
    completion_weight: int = Field(
        default=1, ge=0, description="Usage weight of one completion token (integer)."
    )
    default_quality: float | None = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Quality of a node with no consensus score for the epoch. 1.0 until scoring lands; "
        "None makes the settler wait for scores before committing an epoch.",
    )
    tick_s: float = Field(default=5.0, gt=0, description="Seconds between settlement passes in run().")
    public_rpc_url: str | None = Field(
        default=None,
        description="A JSON-RPC URL of the chain that operators and validators may use, named beside their "
        "reward proofs so `meritnet settlement claim --network URL` needs no --rpc-url (never a URL "
        "holding a provider's key). None: none named.",
    )
    validator_share_bps: int = Field(
        default=2_000,
        ge=0,
        le=BPS,
        description="Validators' part of each epoch's budget in basis points (2,000 = 20%), split by "
        "their Yuma dividends; the rest goes to operators by usage x quality. An epoch with no "
        "validator dividends (no validators, no consensus round) pays operators all of it.",
    )
    validator_stakes: dict[str, float] = Field(
        default_factory=dict,
        description="Validator address -> stake that the settler records on a distributor it deploys "
        "itself while it is that distributor's admin (a local network). A bound distributor "
        "(MERITNET_CHAIN_CONTRACT) keeps the record its admin wrote (`meritnet settlement set-stake`).",
    )
    max_score_wait_epochs: int = Field(
        default=2,
        ge=0,
        description="With default_quality None: an epoch still without consensus scores once this many "
        "later epochs have closed is committed anyway, unscored nodes at weight 0 (so it cannot stop "
        "later epochs for good).",
    )

    @model_validator(mode="after")
    def _cap_covers_emission(self) -> SettlementConfig:
        if self.emission_cap_wei is not None and self.emission_cap_wei < self.emission_wei:
            raise ValueError(
                f"emission_cap_wei ({self.emission_cap_wei}) is below emission_wei ({self.emission_wei}): "
                "the carried difference would grow every epoch and never be paid; raise the cap"
            )
        _, length = self.epochs.onchain()  # whole seconds: the contract must agree with the ledger
        if self.claim_delay_s is not None and length > 0 and self.claim_delay_s >= length:
            raise ValueError(
                f"claim_delay_s ({self.claim_delay_s}) must be shorter than an epoch ({length} s): settle "
                "waits for the last root's veto window, so settlement would fall behind; lengthen the "
                "epochs or shorten the delay"
            )
        return self

    @property
    def epochs(self) -> Epochs:
        return Epochs(self.genesis, self.epoch_length_s)

    @property
    def emission_cap(self) -> int:
        """The cap a newly deployed distributor gets."""
        if self.emission_cap_wei is not None:
            return self.emission_cap_wei
        return EMISSION_CAP_HEADROOM * self.emission_wei

    @property
    def claim_delay(self) -> int:
        """The veto window a newly deployed distributor gets (whole seconds)."""
        if self.claim_delay_s is not None:
            return self.claim_delay_s
        return self.epochs.onchain()[1] // 2

    @property
    def book_path(self) -> Path:
        """The RewardBook lives beside the ledger."""
        return book_path_of(self.ledger_path)


def stake_units(stake: float) -> int:
    """A configured stake (a float, e.g. 2.0) as the distributor's integer record (18 decimals)."""
    return round(stake * 10**18)


class SettlementConflict(RuntimeError):
    """The chain disagrees with this settler (different roots for an epoch, or a distributor timing
    different epochs): stop, a human decides."""


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


def _crash(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _hex(data: bytes) -> str:
    return "0x" + bytes(data).hex()


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
        key: SettlerKey,
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
            _crash("freeze")
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
            self._stuck("chain_unavailable")
            raise
        except ContractReverted:
            metrics.CHAIN_ERRORS.labels("reverted").inc()
            self._stuck("error")
            raise
        except RuntimeError:
            metrics.CHAIN_ERRORS.labels("error").inc()
            self._stuck("error")
            raise
        finally:
            self._report()

    def settle_closed(self) -> list[int]:
        last = self.ledger.last_closed_epoch()
        if last is None:
            return []
        first = self._first_unsettled()
        self._stuck(None)
        for epoch in range(first, last + 1):  # commit ahead: computing waits on no settlement
            if self.commitment(epoch) is None:
                break  # waiting for scores: later epochs' carried wei depends on this one
        done = []
        for epoch in range(first, last + 1):
            if not self._settle_epoch(epoch):
                break  # keep order: the contract takes settle(next_epoch) only
            done.append(epoch)
        return done

    def _stuck(self, state: str | None) -> None:
        """Mark the state the oldest unsettled epoch waits in (None: not stuck)."""
        for s in metrics.STUCK_STATES:
            metrics.STUCK.labels(s).set(1 if s == state else 0)

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
                self._stuck("scores")
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
        _crash("roots")
        return stored

    def _settle_epoch(self, epoch: int) -> bool:
        """Drive one epoch to 'settled'. True when it is settled; False to retry on a later pass."""
        c = self.book.get(epoch)  # committed by settle_closed's first loop, or still waiting for scores
        if c is None:
            return False
        onchain_next = self.chain.next_epoch()
        if onchain_next > epoch:
            return self._adopt_onchain(epoch, c)
        if onchain_next < epoch:
            raise SettlementConflict(
                f"the distributor at {self.chain.address} expects epoch {onchain_next} next, but this "
                f"ledger settled it: the admin vetoed its reward root (RootVetoed event). Settling on "
                "would post the vetoed roots again; a human decides (find why it was vetoed)"
            )
        pending = self.ledger.pending_tx(epoch)
        try:
            if pending is not None:
                raw = self._reconcile_pending(epoch, c, pending)
            else:
                raw = self._sign(c, self.chain.nonce(self.key.address, "pending"), self.chain.fees())
        except ContractReverted as exc:
            if exc.error == "RootPending":
                self._stuck("root_pending")
                log.info(
                    "epoch %d: the reward root of epoch %d is in its veto window until %d; settling "
                    "epoch %d after it",
                    epoch,
                    exc.error_args[0],
                    exc.error_args[1],
                    epoch,
                )
                return False
            if exc.error != "EpochNotEnded":
                raise
            self._stuck("chain_clock")
            log.info(
                "epoch %d: the chain's clock has not reached its end (%d) yet; settling it next pass",
                epoch,
                exc.error_args[1],
            )
            return False
        if raw is None:
            return self._adopt_onchain(epoch, c)
        tx_hash = self.chain.send_raw(raw)
        _crash("broadcast")
        receipt = self.chain.wait_receipt(tx_hash)
        if receipt is None:
            self._stuck("receipt")
            log.warning(
                "epoch %d: tx %s not mined yet; will rebroadcast or bump next pass", epoch, tx_hash.hex()
            )
            return False
        _crash("receipt")
        if receipt["status"] != 1:
            # Reverted: most likely the epoch was settled by an earlier tx of ours in the meantime.
            if self.chain.next_epoch() > epoch:
                return self._adopt_onchain(epoch, c)
            self.ledger.clear_pending_tx(epoch)
            raise RuntimeError(f"the settle tx of epoch {epoch} reverted; it will be re-signed next pass")
        self.ledger.mark_settled(epoch, _hex(tx_hash))
        log.info("epoch %d settled in tx %s (gas %d)", epoch, tx_hash.hex(), receipt["gasUsed"])
        metrics.SETTLE_GAS.inc(receipt["gasUsed"])
        metrics.LAST_SETTLE_GAS.set(receipt["gasUsed"])
        return True

    def _sign(self, c: EpochCommitment, nonce: int, fees: Fees) -> bytes:
        fees = fees.capped(self.chain.settings.max_fee_cap_wei)  # never sign above the fee cap
        try:
            self.chain.preflight_settle(
                self.key.address, c.epoch, c.usage_root, c.reward_root, c.interactions, c.epoch_reward
            )
        except ContractReverted as exc:
            if exc.error == "EpochAlreadySettled":
                return None
            raise
        raw = self.chain.sign_settle(
            self.key, c.epoch, c.usage_root, c.reward_root, c.interactions, c.epoch_reward, nonce, fees
        )
        _crash("sign")
        self.ledger.put_pending_tx(c.epoch, raw, nonce, _hex(self._hash(raw)))
        _crash("written")
        return raw

    def _reconcile_pending(self, epoch: int, c: EpochCommitment, pending: Any) -> bytes | None:
        """A tx was written ahead in an earlier run: reuse, rebroadcast or replace it."""
        raw = bytes(pending.raw_tx)
        info = self.chain.tx_info(self._hash(raw))
        if info.state == "pending":
            return self._reprice_if_stuck(c, raw)
        if info.state == "mined":
            # Mined but the epoch is not on-chain (checked before): it reverted; its nonce is spent.
            return self._sign(c, self.chain.nonce(self.key.address, "pending"), self.chain.fees())
        # Dropped: the node forgot it. Same nonce if still free (so it replaces), else the next one.
        nonce, old_fees = fees_of_raw(raw)
        if self.chain.nonce(self.key.address, "latest") > nonce:
            nonce = self.chain.nonce(self.key.address, "pending")
        fees = old_fees.bumped(self.chain.settings.fee_bump_percent).at_least(self.chain.fees())
        log.info("epoch %d: written-ahead tx dropped; re-signing at nonce %d with bumped fees", epoch, nonce)
        return self._sign(c, nonce, fees)

    def _reprice_if_stuck(self, c: EpochCommitment, raw: bytes) -> bytes:
        """A pending tx: the same bytes (rebroadcast, idempotent) until it has been pending for
        reprice_after_blocks, then a replacement at the same nonce with bumped fees, never above the
        fee cap. One the cap leaves no room to replace stays as it is (logged each pass)."""
        settings = self.chain.settings
        block = self.chain.block_number()
        since = self.ledger.pending_since(c.epoch, _hex(self._hash(raw)), block)  # survives restarts
        metrics.PENDING_TX_AGE_BLOCKS.set(block - since)
        if block - since < settings.reprice_after_blocks:
            return raw
        nonce, old = fees_of_raw(raw)
        fees = (
            old.bumped(settings.fee_bump_percent).at_least(self.chain.fees()).capped(settings.max_fee_cap_wei)
        )
        if not fees.replaces(old):
            self._stuck("fee_cap")
            log.warning(
                "epoch %d: settle tx pending for %d blocks at max fee %d wei; the fee cap (%d wei) "
                "leaves no room to re-price it",
                c.epoch,
                block - since,
                old.max_fee,
                settings.max_fee_cap_wei,
            )
            return raw
        log.info(
            "epoch %d: settle tx pending for %d blocks; re-pricing at nonce %d, max fee %d -> %d wei",
            c.epoch,
            block - since,
            nonce,
            old.max_fee,
            fees.max_fee,
        )
        return self._sign(c, nonce, fees)

    def _adopt_onchain(self, epoch: int, c: EpochCommitment) -> bool:
        """The epoch is on-chain: check it carries our roots, then record it as settled."""
        onchain = self.chain.usage_root(epoch)
        events = self.chain.settled_events(epoch)
        if onchain != c.usage_root or (events and bytes(events[-1]["reward_root"]) != c.reward_root):
            raise SettlementConflict(
                f"epoch {epoch} is on-chain with usage root 0x{onchain.hex()}, but this settler committed "
                f"0x{c.usage_root.hex()}: another settler or a different ledger posted it; "
                "check MERITNET_CHAIN_CONTRACT and the ledger path"
            )
        self.ledger.mark_settled(epoch, _hex(events[-1]["tx_hash"]) if events else "0x")
        return True

    @staticmethod
    def _hash(raw: bytes) -> bytes:
        from web3 import Web3

        return bytes(Web3.keccak(raw))


class SettlementService:
    """Builds a Settler inside the process that runs it (the key is loaded here, never shipped)."""

    def __init__(
        self,
        config: SettlementConfig | None = None,
        chain: ChainSettings | None = None,
        quality: Mapping[int, Mapping[str, float]] | None = None,
        key_file: str | None = None,
    ) -> None:
        from settlement.ledger import UsageLedger

        config = config or SettlementConfig()
        self.ledger = UsageLedger(config.ledger_path, config.epoch_length_s, genesis=config.genesis)
        self.chain = Chain.connect(chain or ChainSettings())
        self.key = SettlerKey.load(Path(key_file) if key_file else None)
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

"""Getting one committed epoch on-chain exactly once: sign -> write ahead -> broadcast -> receipt.

The settle tx is signed at the settler's next nonce and its raw bytes are written ahead
(ledger.put_pending_tx) BEFORE broadcast; the receipt is awaited and the epoch marked settled
(ledger.mark_settled(e, tx_hash)). The contract also refuses an epoch before the chain's clock has
passed its end (EpochNotEnded, see cluster.epochs); the ledger closes an epoch no earlier, so that
refusal only means the chain's clock lags this process's: the epoch waits for the next pass.

On every pass `SettleTx.settle` first asks the chain: the contract's next_epoch > e means e is on-chain
(mark it, whichever tx did it); a written-ahead tx that is pending is rebroadcast byte for byte, and
replaced at the same nonce with bumped fees (never above max_fee_cap_wei) once it has been pending
for reprice_after_blocks; one the node no longer knows (dropped) is re-signed at the same nonce with
bumped fees. The contract accepts each epoch once (epoch == next_epoch), so nothing is ever paid
twice. A chain that does not answer raises ChainUnavailable: the epochs stay queued and settle in
order once it is back. Each state an epoch waits in sets meritnet_settlement_stuck{state=...}.

Fault injection for the tests: MERITNET_CRASH_AT=<step> SIGKILLs this process the first time it
reaches that step (freeze, roots, sign, written, broadcast, receipt; the first two are the settler's).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from settlement import metrics
from settlement.chain import ContractReverted
from settlement.fees import Fees, fees_of_raw
from settlement.interfaces import SettlementChain, SettlementLedger
from settlement.keys import Signer
from settlement.rewardbook import EpochCommitment

log = logging.getLogger(__name__)

CRASH_ENV = "MERITNET_CRASH_AT"
CRASH_STEPS = ("freeze", "roots", "sign", "written", "broadcast", "receipt")


class SettlementConflict(RuntimeError):
    """The chain disagrees with this settler (different roots for an epoch, or a distributor timing
    different epochs): stop, a human decides."""


def crash(step: str) -> None:
    """SIGKILL this process at `step` if MERITNET_CRASH_AT names it (fault-injection tests)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def mark_stuck(state: str | None) -> None:
    """Mark the state the oldest unsettled epoch waits in (None: not stuck)."""
    for s in metrics.STUCK_STATES:
        metrics.STUCK.labels(s).set(1 if s == state else 0)


def _hex(data: bytes) -> str:
    return "0x" + bytes(data).hex()


class SettleTx:
    """Drives committed epochs to 'settled' on the distributor, one settle tx each (module doc)."""

    def __init__(self, ledger: SettlementLedger, chain: SettlementChain, key: Signer) -> None:
        self.ledger = ledger
        self.chain = chain
        self.key = key

    def settle(self, c: EpochCommitment) -> bool:
        """Drive epoch `c.epoch` to 'settled'. True when it is settled; False to retry on a later pass."""
        epoch = c.epoch
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
                mark_stuck("root_pending")
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
            mark_stuck("chain_clock")
            log.info(
                "epoch %d: the chain's clock has not reached its end (%d) yet; settling it next pass",
                epoch,
                exc.error_args[1],
            )
            return False
        if raw is None:
            return self._adopt_onchain(epoch, c)
        tx_hash = self.chain.send_raw(raw)
        crash("broadcast")
        receipt = self.chain.wait_receipt(tx_hash)
        if receipt is None:
            mark_stuck("receipt")
            log.warning(
                "epoch %d: tx %s not mined yet; will rebroadcast or bump next pass", epoch, tx_hash.hex()
            )
            return False
        crash("receipt")
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

    def _sign(self, c: EpochCommitment, nonce: int, fees: Fees) -> bytes | None:
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
        crash("sign")
        self.ledger.put_pending_tx(c.epoch, raw, nonce, _hex(self._hash(raw)))
        crash("written")
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
            mark_stuck("fee_cap")
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

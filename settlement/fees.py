"""EIP-1559 fees of settlement's transactions: Fees (bump, floor, cap, the replacement rule) and
fees_of_raw, which reads them back from a signed tx so a stuck one can be re-signed at its nonce."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.typed_transactions import TypedTransaction
from hexbytes import HexBytes


@dataclass(frozen=True)
class Fees:
    """EIP-1559 fees in wei."""

    max_fee: int
    priority_fee: int

    def bumped(self, percent: int) -> Fees:
        # Round up so a bump of a tiny fee still increases it (nodes compare strictly).
        return Fees(
            self.max_fee + (self.max_fee * percent + 99) // 100,
            self.priority_fee + (self.priority_fee * percent + 99) // 100,
        )

    def at_least(self, other: Fees) -> Fees:
        return Fees(max(self.max_fee, other.max_fee), max(self.priority_fee, other.priority_fee))

    def capped(self, max_fee: int) -> Fees:
        return Fees(min(self.max_fee, max_fee), min(self.priority_fee, max_fee))

    def replaces(self, old: Fees) -> bool:
        """Whether a node takes this as a replacement of `old`: both fees >= 12.5% higher."""
        return 8 * self.max_fee >= 9 * old.max_fee and 8 * self.priority_fee >= 9 * old.priority_fee


def fees_of_raw(raw: bytes) -> tuple[int, Fees]:
    """Nonce and fees of a signed type-2 transaction (to re-sign it with bumped fees)."""
    tx = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
    return int(tx["nonce"]), Fees(int(tx["maxFeePerGas"]), int(tx["maxPriorityFeePerGas"]))

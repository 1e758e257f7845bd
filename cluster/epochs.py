"""Epoch arithmetic, written once: which epoch a time falls in, when an epoch ends, and the
whole-second form the distributor checks.

Epoch e covers [genesis + e x length, genesis + (e + 1) x length), in unix seconds. Times before
genesis count as epoch 0 (the ledger's first epoch).

On chain the distributor refuses `settle(e)` before `block.timestamp >= genesis + (e + 1) x length`
in whole seconds, since block timestamps are whole seconds. `onchain()` gives its two numbers:
genesis floored (so every on-chain end is at or before the ledger's own) and the length, which must
be a whole number of seconds (>= 1) so the two never drift apart. An epoch the ledger has closed is
therefore settle-able as soon as the chain's clock has reached the ledger's end of it; a chain whose
clock lags the settler's by a few seconds only delays settlement by as much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Epochs:
    """The network's epochs: `genesis` (unix seconds, start of epoch 0) and `length_s` (seconds)."""

    genesis: float
    length_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.length_s) and self.length_s > 0):
            raise ValueError(f"epoch_length_s must be a positive number of seconds, got {self.length_s!r}")
        if not math.isfinite(self.genesis):
            raise ValueError(f"genesis must be a finite unix time, got {self.genesis!r}")

    def _index(self, t: float) -> int:
        # Epochs since genesis, negative before it.
        return math.floor((t - self.genesis) / self.length_s)

    def epoch_of(self, t: float) -> int:
        """The epoch a time falls in (epoch 0 before genesis)."""
        return max(0, self._index(t))

    def bounds(self, epoch: int) -> tuple[float, float]:
        """[start, end) of an epoch in unix seconds."""
        start = self.genesis + epoch * self.length_s
        return start, start + self.length_s

    def last_ended(self, now: float) -> int:
        """The last epoch that has fully ended by `now` (-1 if none)."""
        return self._index(now) - 1

    def onchain(self) -> tuple[int, int]:
        """(genesis, epoch length) in whole seconds, as the distributor is deployed with and checks."""
        if self.length_s < 1 or self.length_s != int(self.length_s):
            raise ValueError(
                f"epoch_length_s must be a whole number of seconds (>= 1) to settle on chain, got "
                f"{self.length_s!r}: the distributor times epochs with block timestamps (whole seconds)"
            )
        if self.genesis < 0:
            raise ValueError(f"genesis must be a unix time >= 0 to settle on chain, got {self.genesis!r}")
        return math.floor(self.genesis), int(self.length_s)

"""Consensus quality and validator dividends per settlement epoch (pure; no Ray).

Quality_i of settlement epoch N is the mean of node i's consensus quality
(`scoring.quality_from_consensus`: consensus_i / max_k consensus_k, in [0, 1]) over the consensus
rounds that ran while N was open (genesis + N*len <= t < genesis + (N+1)*len), i.e. a time average
since rounds are periodic. After every round the consensus service (`scoring.consensus_service`) sends
the running mean of the open epoch with `SettlementService.submit_quality(N, {node: q}, {validator
address: dividend})`; the last send before N ends is the final one, and the settler ignores sends once
N is committed. A validator's dividend for N is the mean of its Yuma dividends
(`scoring.ConsensusState.dividends`) over N's rounds, keyed by the address its reports are signed
with: settlement pays it there (validator_share_bps of the epoch's emission is split by these).

A node caught cheating for the whole epoch has mean 0 and so earns 0; a node no round scored in N gets
the settler's `default_quality`, which the network sets to 0 with validators (probation: no weight
until a first consensus score) and to 1.0 without them (the demo).
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.epochs import Epochs


class EpochQuality:
    """Time average of consensus quality per settlement epoch (see the module doc for the mapping)."""

    def __init__(self, epoch_length_s: float, genesis: float) -> None:
        self._epochs = Epochs(genesis, epoch_length_s)  # validates; the one epoch arithmetic
        self.epoch_length_s, self.genesis = epoch_length_s, genesis
        self._sums: dict[int, dict[str, float]] = {}
        self._rounds: dict[int, dict[str, int]] = {}
        self._dividends: dict[int, dict[str, float]] = {}  # epoch -> validator address -> sum
        self._dividend_rounds: dict[int, int] = {}

    def epoch_of(self, t: float) -> int:
        return self._epochs.epoch_of(t)

    def add(self, t: float, quality: Mapping[str, float]) -> tuple[int, dict[str, float]]:
        """Record one consensus round at unix time t; returns (its epoch, that epoch's mean so far)."""
        epoch = self.epoch_of(t)
        sums, rounds = self._sums.setdefault(epoch, {}), self._rounds.setdefault(epoch, {})
        for node, q in quality.items():
            sums[node] = sums.get(node, 0.0) + float(q)
            rounds[node] = rounds.get(node, 0) + 1
        for old in [e for e in self._sums if e < epoch - 4]:  # keep a few recent epochs for audits
            del self._sums[old], self._rounds[old]
        for old in [e for e in self._dividends if e < epoch - 4]:
            del self._dividends[old], self._dividend_rounds[old]
        return epoch, self.mean(epoch) or {}

    def add_dividends(self, t: float, dividends: Mapping[str, float]) -> dict[str, float]:
        """Record one round's validator dividends (address -> share); returns the epoch's mean so far
        (every round of the epoch counts, so a validator absent from some rounds earns less)."""
        epoch = self.epoch_of(t)
        sums = self._dividends.setdefault(epoch, {})
        self._dividend_rounds[epoch] = self._dividend_rounds.get(epoch, 0) + 1
        for validator, d in dividends.items():
            sums[validator] = sums.get(validator, 0.0) + float(d)
        return self.mean_dividends(epoch) or {}

    def mean_dividends(self, epoch: int) -> dict[str, float] | None:
        if epoch not in self._dividends:
            return None
        rounds = self._dividend_rounds[epoch]
        return {v: max(0.0, s / rounds) for v, s in self._dividends[epoch].items()}

    def mean(self, epoch: int) -> dict[str, float] | None:
        if epoch not in self._sums:
            return None
        return {n: min(1.0, max(0.0, s / self._rounds[epoch][n])) for n, s in self._sums[epoch].items()}

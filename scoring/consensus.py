"""Yuma Consensus (original Yuma, as in Bittensor subtensor's `epoch_dense` in run_epoch.rs).

Validators (rows) weight nodes (columns). One epoch:

1. stake is normalised to sum 1 over every *configured* validator (validators with no stake take no
   part); weights are row-normalised (each validator spends a unit of weight). Stake is the network's
   configuration, never a validator's own word, and a validator that sent nothing this round keeps its
   stake with a zero row: it weights nothing, and the others do not grow to 100% of the stake.
2. prerank_j   = sum_i S_i W_ij                       (stake-weighted support before clipping)
3. consensus_j = stake-weighted median of column j with majority kappa: the largest value v that
   validators holding kappa of the stake weight at >= v (`weighted_median`; an exact kappa share
   is a tie, see below).
4. clipped W'_ij = min(W_ij, consensus_j): weight above what the majority agrees on is ignored,
   so a minority cannot lift a node it favours.
5. validator_trust_i = sum_j W'_ij                    (share of i's weight that survived clipping)
6. rank_j = sum_i S_i W'_ij; trust_j = rank_j / prerank_j; incentive = rank / sum(rank).
7. bonds: delta B_ij = S_i W'_ij column-normalised; B <- alpha * delta + (1 - alpha) * B_prev
   (B_prev column-normalised first), column-normalised again. alpha 0.1 is subtensor's
   default bonds_moving_average 900_000 / 1e6 -> 1 - 0.9. With `public` (below), bonds are bought
   only with support beyond what was already published.
8. dividends_i = sum_j B_ij incentive_j, normalised to sum 1: a validator's share of the validators'
   emission. Bonds build up slowly (EMA), so a validator that weighted a node the majority later
   agrees on holds more of its bond than one that copied the majority late, and earns more.

Copying (issue 28 item 14). The consensus quality is public (`/metrics`, `/status.json`), and in a
network where little changes, last round's consensus is this round's: a validator that sends it one
round late is fully in consensus, and original Yuma pays its bonds the same EMA as anyone's, so it
earns about its stake share without running a reference engine. Commit-reveal (Bittensor) would not
help here: it hides weights that sit on a public chain until a copier can no longer use them, while
our reports are already answers to one signed round, asked before that round's consensus exists and
refused for any other round (`scoring.report`). What a copier has when it answers round k is what
round k-1 published, however it is delivered; a copy and an honest report of an unchanged network
are the same numbers. So the fix is on the paying side: a bond is bought only with what was not yet
public. `yuma_epoch(..., public=P)` takes P, the weight row a copier of the last published consensus
sends (that consensus over the nodes it published, row-normalised), and builds bonds from the fresh
support F_ij = max(0, W''_ij - P_j) (W'' the clipped weights step 7 uses) instead of W''_ij; the
EMA rate of node j is alpha times the stake-weighted share of its support that is fresh, so a node
whose consensus did not move trades no bonds, and a node nobody had published (P_j = 0, e.g. at
genesis) trades exactly as in original Yuma.

The bound: in round k a validator's new bond on node j is at most its stake times (C_j(k) - P_j)+,
the part of node j's consensus that was not public when round k was asked. Sending the published
consensus (or anything below it) buys no bond in any round: a pure copier's dividends are 0, and a
validator that turns copier keeps only the bonds it bought, which shrink as others buy. Deviating
from P pays only on the moves a validator backed before they were published, while its weight above
the consensus is clipped as usual. What it costs: when nothing changes nobody buys bonds (honest
validators live on the bonds they bought when they were first to back a change: a node joining, a
node caught, speed moving), and a new validator, honest or not, earns nothing until it is first to
back a change, because until then nothing tells it from a copier. Not covered: the consensus actor
also re-exports each validator's per-node gauges after a round; a validator that copies the row of
one that is ahead of the majority buys bonds when the majority catches up a round later (no more
than that leader's lead).

One deliberate difference from subtensor, at an exact tie in step 3. Subtensor takes the largest value
backed by *at least* kappa of the stake (its default kappa, 32767/65535, is even just under 0.5), so
when validators holding exactly half the stake weight a node at a and the other half at b < a (or not
at all: 0), the median is a, and the first half decides alone. Here a value backed by exactly kappa
of the stake is half a majority: the median is the midpoint (a + b) / 2 between it and the largest
value backed by more than kappa, the textbook median of an even split. Neither half sets it alone,
upward or downward; without an exact tie the result is subtensor's. `ConsensusState` adds the other
half of the rule: a node is scored only once more than kappa of the stake has an opinion on it.
kappa is in (0, 1).

Subtensor runs this in I32F32 fixed point; we use float64, with a 1e-12 tolerance in the median so
an exact kappa share (e.g. stakes 1/3 + 1/6 against 1/2) is found as a tie despite rounding.
Subtensor's masks for inactive / unpermitted / self-weights / recently registered do not apply here:
validators and nodes are disjoint sets, and stale scores are dropped by `ConsensusState`'s activity
cutoff.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cluster.records import NodeScore, QualityScores

_EPS = 1e-12
# Fresh support below this (a weight share) is rounding: a copied consensus comes back through
# quality -> NodeScore.score -> row normalisation a few ulps away from the published row.
_FRESH_TOL = 1e-9


@dataclass(frozen=True)
class YumaResult:
    """One epoch's outcome. Arrays are read-only; per-node arrays have length N, per-validator V."""

    consensus: np.ndarray  # N, stake-weighted kappa-median of the (row-normalised) weights
    incentive: np.ndarray  # N, normalised rank (sums to 1, or all 0 when nobody weighted anything)
    dividends: np.ndarray  # V, normalised bond-weighted incentive
    bonds: np.ndarray  # V x N, column-normalised EMA bonds; pass back as `bonds` next epoch
    validator_trust: np.ndarray  # V, sum of a validator's clipped weights (1 = fully in consensus)
    rank: np.ndarray  # N, sum_i S_i W'_ij before normalisation
    trust: np.ndarray  # N, rank / prerank (1 = no support clipped away)
    weights: np.ndarray  # V x N, the row-normalised weights used
    clipped_weights: np.ndarray  # V x N
    stake: np.ndarray  # V, normalised stake
    fresh: np.ndarray  # N, stake-weighted share of the bond-building support that was not public


def _normalize(v: np.ndarray) -> np.ndarray:
    """Divide by the sum; an all-zero vector stays zero (as subtensor's inplace_normalize)."""
    total = v.sum()
    return v / total if total > 0 else v.copy()


def _row_normalize(m: np.ndarray) -> np.ndarray:
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def _col_normalize(m: np.ndarray) -> np.ndarray:
    sums = m.sum(axis=0, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def weighted_median(stake: np.ndarray, scores: np.ndarray, kappa: float) -> float:
    """Largest score v such that the validators scoring >= v hold `kappa` of the stake.

    Subtensor's `weighted_median` with minority = 1 - kappa, except at an exact tie: when the largest
    such v is backed by exactly kappa, the result is the midpoint between it and the largest value
    backed by more than kappa (see the module doc). Only positive stake counts; a zero score is a
    score (an absent validator's zero row backs nothing above 0).
    """
    keep = stake > 0
    if not keep.any():
        return 0.0
    s = stake[keep] / stake[keep].sum()
    x = scores[keep]
    tie = None
    for v in np.unique(x)[::-1]:  # descending; the smallest value has all the stake, so this returns
        share = s[x >= v].sum()
        if _majority(share, kappa):
            return float(v if tie is None else (tie + v) / 2)
        if tie is None and share >= kappa - _EPS:
            tie = v  # exactly kappa: half a majority
    raise AssertionError("unreachable for kappa < 1")


def _majority(share, kappa: float):
    """More than kappa of the (normalised) stake; an exact kappa share, up to rounding, is not."""
    return share > kappa + _EPS


def _weighted_median_col(stake: np.ndarray, weights: np.ndarray, kappa: float) -> np.ndarray:
    return np.array([weighted_median(stake, weights[:, j], kappa) for j in range(weights.shape[1])])


def _as_matrix(name: str, a, shape: tuple[int, int] | None = None) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (validators x nodes), got shape {m.shape}")
    if shape is not None and m.shape != shape:
        raise ValueError(
            f"{name} has shape {m.shape} but weights have shape {shape}; pass last epoch's bonds"
        )
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    return m


def yuma_epoch(
    weights,
    stake,
    bonds=None,
    kappa: float = 0.5,
    alpha: float = 0.1,
    *,
    bonds_penalty: float = 1.0,
    public=None,
) -> YumaResult:
    """Run one epoch of original Yuma Consensus.

    weights: V x N non-negative (any scale; rows are normalised). stake: V non-negative.
    bonds: last epoch's `YumaResult.bonds` (V x N) or None for a fresh start.
    kappa: a value needs more than this fraction of stake behind it. alpha: bonds EMA rate.
    bonds_penalty: 1 builds bonds from clipped weights (subtensor's default), 0 from raw weights.
    public: N, the weight row that was public before these weights were asked (the last published
    consensus, row-normalised; 0 for a node not published): bonds are bought only with support above
    it (module doc, "Copying"). None: original Yuma (as if nothing had been published).
    """
    w = _as_matrix("weights", weights)
    v_count, _n_count = w.shape
    s = np.asarray(stake, dtype=np.float64)
    if s.shape != (v_count,):
        raise ValueError(f"stake must have one entry per validator ({v_count}), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or (s < 0).any():
        raise ValueError("stake must be finite and non-negative")
    if not 0.0 < kappa < 1.0:
        raise ValueError(f"kappa must be in (0, 1) (more than kappa of the stake decides), got {kappa}")
    if not 0.0 <= alpha <= 1.0 or not 0.0 <= bonds_penalty <= 1.0:
        raise ValueError("alpha and bonds_penalty must be in [0, 1]")
    b_prev = np.zeros_like(w) if bonds is None else _as_matrix("bonds", bonds, w.shape)
    p = np.zeros(w.shape[1]) if public is None else _as_matrix("public", np.reshape(public, (1, -1)))[0]
    if p.shape != (w.shape[1],):
        raise ValueError(f"public must have one entry per node ({w.shape[1]}), got {p.shape[0]}")

    s = _normalize(s)
    w = _row_normalize(w)
    preranks = w.T @ s
    consensus = _weighted_median_col(s, w, kappa)
    clipped = np.minimum(w, consensus[None, :])
    validator_trust = clipped.sum(axis=1)
    ranks = clipped.T @ s
    trust = np.divide(ranks, preranks, out=np.zeros_like(ranks), where=preranks > 0)
    incentive = _normalize(ranks)

    w_bonds = w + bonds_penalty * (clipped - w)  # subtensor's interpolate(weights, clipped, penalty)
    support = np.maximum(w_bonds - p[None, :], 0.0)  # what was not public when the weights were asked
    if public is not None:
        support[support < _FRESH_TOL] = 0.0  # a copy rounded on its way back in buys nothing
    held = s @ w_bonds
    fresh = np.divide(s @ support, held, out=np.zeros_like(held), where=held > 0)
    delta = _col_normalize(support * s[:, None])
    rate = alpha * fresh  # per node: a consensus that did not move trades no bonds
    ema = _col_normalize(rate * delta + (1.0 - rate) * _col_normalize(b_prev))
    dividends = _normalize(ema @ incentive)

    arrays = {
        "consensus": consensus,
        "incentive": incentive,
        "dividends": dividends,
        "bonds": ema,
        "validator_trust": validator_trust,
        "rank": ranks,
        "trust": trust,
        "weights": w,
        "clipped_weights": clipped,
        "stake": s,
        "fresh": fresh,
    }
    for a in arrays.values():
        a.setflags(write=False)
    return YumaResult(**arrays)


def quality_from_consensus(result: YumaResult, node_ids, epoch: int = 0) -> QualityScores:
    """Map consensus to the quality in [0,1] that the router and settlement use.

    quality_j = consensus_j / max_k consensus_k (0 for everyone when no node has consensus).

    Why consensus and not incentive: consensus is already clipped to what a kappa-majority of stake
    agrees on, so a minority cannot inflate it; dividing by the best node makes the top node 1.0,
    independent of how many nodes share the weight (raw consensus shrinks as 1/N with more nodes,
    which would make "quality" mean "fleet size"). A node every majority validator weights at 0
    (e.g. caught cheating) gets exactly 0: no routing share beyond the router's floor, and zero
    reward in settlement's usage x quality. Incentive (rank) is the stake-weighted sum of clipped
    weights and gives the same ordering; it is kept in the result for audit.
    """
    ids = list(node_ids)
    if len(ids) != result.consensus.shape[0]:
        raise ValueError(f"got {len(ids)} node ids for {result.consensus.shape[0]} consensus columns")
    top = float(result.consensus.max()) if len(ids) else 0.0
    q = result.consensus / top if top > 0 else np.zeros_like(result.consensus)
    return QualityScores(epoch=epoch, quality={nid: float(min(1.0, max(0.0, x))) for nid, x in zip(ids, q)})


class SavedBonds(BaseModel):
    """Consensus bonds as kept on disk between runs (parsed strictly: a bond is a share in [0, 1])."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epoch: int = Field(ge=0)
    bonds: list[tuple[str, str, Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]]]
    public: list[tuple[str, Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]]] = Field(
        default_factory=list,
        description="The last published consensus as a weight row (node, share): what the next round's "
        "bonds are bought above. Absent in files from before it existed: the next round trades as at genesis.",
    )


class ConsensusState:
    """Runs Yuma epoch after epoch over the configured validators and changing nodes, carrying the bonds.

    `stakes` (validator id -> stake) is the network's configuration and fixes the rows: each round's
    scores come from the validators that answered, scores of an id not configured are ignored, and
    a configured validator that sent nothing (dead, late, or refused) keeps its stake in the
    denominator with a zero row. No validator's own word changes a weight's stake.

    Feed it every validator's current `NodeScore`s (their `score` is the validator's weight); it
    returns the `QualityScores` for the router and settlement plus the raw result for audit.
    A validator that has not scored a node gives it weight 0 in Yuma, as in subtensor. But a node is
    only *scored* (present in the returned quality) once validators holding more than kappa of the
    stake have an opinion on it: before that no majority can back a positive value, so its consensus
    is 0 by construction, which means "not yet verified", not "caught". Reporting it as quality 0
    would make settlement pay an honest node nothing for an epoch in which its verifications were
    still queued; absent, it is unscored (the router's `unscored` score, settlement's rule for
    unscored nodes). The same rule keeps a validator with half the stake from scoring a node alone.
    """

    def __init__(
        self,
        stakes: Mapping[str, float],
        kappa: float = 0.5,
        alpha: float = 0.1,
        activity_cutoff_s: float | None = None,
    ) -> None:
        if not stakes:
            raise ValueError("consensus needs at least one configured validator (stakes is empty)")
        if activity_cutoff_s is not None and activity_cutoff_s <= 0:
            raise ValueError(f"activity_cutoff_s must be > 0 (or None), got {activity_cutoff_s}")
        self.validators = sorted(stakes)
        self.set_stakes(stakes)
        self.kappa, self.alpha = kappa, alpha
        # A validator's score of a node older than this (NodeScore.at) is ignored: a validator that
        # stopped observing a node (dead loop, partition) cannot keep voting on it (subtensor's
        # activity_cutoff). None keeps every score.
        self.activity_cutoff_s = activity_cutoff_s
        self.epoch = 0
        self._bonds: dict[tuple[str, str], float] = {}
        # node -> share of the row a copier of the last published consensus sends; bonds are bought
        # only above it (module doc, "Copying"). Nothing is published before the first round.
        self._public: dict[str, float] = {}
        self.last: YumaResult | None = None
        self.nodes: list[str] = []

    def set_stakes(self, stakes: Mapping[str, float]) -> None:
        """New stakes for the configured validators (e.g. read from the chain's record); the rows stay
        the configured ones, so every configured validator needs a stake (0 = no weight)."""
        if set(stakes) != set(self.validators):
            raise ValueError(
                f"stakes are for {sorted(stakes)}, but the configured validators are {self.validators}"
            )
        stake = np.array([float(stakes[v]) for v in self.validators])
        if not np.all(np.isfinite(stake)) or (stake < 0).any():
            raise ValueError("stakes must be finite and non-negative")
        self.stake = stake

    def step(
        self, scores_by_validator: Mapping[str, Sequence[NodeScore]], node_ids=None, now: float | None = None
    ) -> QualityScores:
        if self.activity_cutoff_s is not None:
            oldest = (time.time() if now is None else now) - self.activity_cutoff_s
            scores_by_validator = {
                v: [s for s in ss if s.at >= oldest] for v, ss in scores_by_validator.items()
            }
        validators = self.validators
        known = [scores_by_validator.get(v, ()) for v in validators]  # unconfigured ids are dropped here
        nodes = sorted(node_ids) if node_ids is not None else sorted({s.node_id for ss in known for s in ss})
        col = {n: j for j, n in enumerate(nodes)}
        w = np.zeros((len(validators), len(nodes)))
        seen = np.zeros(w.shape, dtype=bool)  # which validator has an opinion on which node
        for i, ss in enumerate(known):
            for s in ss:
                if s.node_id in col:
                    w[i, col[s.node_id]] = s.score
                    seen[i, col[s.node_id]] = True
        b = np.array([[self._bonds.get((v, n), 0.0) for n in nodes] for v in validators]).reshape(w.shape)
        # The copier's row over this round's nodes: what it sends is row-normalised like anyone's.
        public = _normalize(np.array([self._public.get(n, 0.0) for n in nodes]))
        r = yuma_epoch(w, self.stake, b, kappa=self.kappa, alpha=self.alpha, public=public)
        self._bonds = {
            (v, n): float(r.bonds[i, j]) for i, v in enumerate(validators) for j, n in enumerate(nodes)
        }
        self.last, self.nodes = r, nodes
        covered = _majority(seen.T @ r.stake, self.kappa)  # stake share with an opinion, per node
        q = quality_from_consensus(r, nodes, epoch=self.epoch)
        self.epoch += 1
        published = {n: x for n, x in q.quality.items() if covered[col[n]]}
        total = sum(published.values())  # quality is consensus / max: the same row once normalised
        self._public = {n: x / total for n, x in published.items()} if total > 0 else {}
        return q.model_copy(update={"quality": published})

    def saved(self) -> SavedBonds:
        """What a restarted consensus needs to go on where this one is: the bonds and the round count."""
        return SavedBonds(
            epoch=self.epoch,
            bonds=[(v, n, b) for (v, n), b in sorted(self._bonds.items())],
            public=sorted(self._public.items()),
        )

    def restore(self, saved: SavedBonds) -> None:
        """Go on from `saved()`: bonds of validators no longer configured are dropped (a validator added
        since starts with none, as a new one does)."""
        self._bonds = {(v, n): b for v, n, b in saved.bonds if v in self.validators}
        self._public = dict(saved.public)
        self.epoch = saved.epoch

    def validator_trust(self) -> dict[str, float]:
        if self.last is None:
            return {}
        return {v: float(t) for v, t in zip(self.validators, self.last.validator_trust)}

    def dividends(self) -> dict[str, float]:
        """Each configured validator's dividend share of the last round (sums to 1, or all 0 when no
        node had incentive): what its bonds earn. Settlement pays validators by these (per epoch,
        averaged over the epoch's rounds: scoring.epoch_quality.EpochQuality)."""
        if self.last is None:
            return {}
        return {v: float(d) for v, d in zip(self.validators, self.last.dividends)}

"""One validator's score of each node, in [0, 1], from what its challenges and verifications observed.

    integrity    = 0                                  while the node is convicted (see below)
                 = 1 - (S / A)^2                      otherwise; S the node's CUSUM statistic, A its
                                                      conviction threshold: 1 with no evidence against
                                                      the node, falling smoothly as evidence mounts
    availability = EMA_a(challenge answered = 1, error / timeout = 0)     (a = availability_alpha)
    speed        = 0.5 * min(1, fleet_median_ttft / ttft) + 0.5 * min(1, tps / fleet_median_tps)
                   where ttft and tps are the node's EMAs (a = speed_alpha) and the medians are over
                   the nodes of the same model this validator has measured; a node at least as fast as
                   the median scores 1, one twice as slow ~0.5.
    score        = integrity * (w_avail * availability + (1 - w_avail) * speed)
                   with only the parts measured so far: a node verified through shadow samples of its
                   organic traffic before this validator's first challenge reached it scores its
                   integrity alone (availability and speed unknown are no evidence against it).

Why integrity multiplies: a node that serves the wrong model must earn nothing, however fast it is.

The sequential test. Each verified completion brings `scoring.verify.Evidence`: n tokens judged, v
violations (tokens whose margin honest float noise does not explain) and their log-likelihood ratio
L = v ln(p1/p0) + (n - v) ln((1-p1)/(1-p0)), H1 "violation rate >= p1" (a cheat) against H0 "rate
<= p0" (honest noise; p0, p1 = VerifyThresholds.honest_rate / cheat_rate). Per node, CUSUM:

    S <- max(0, S + L)        conviction when S >= A = ln(M / alpha)

so honest evidence (L < 0) clears earlier suspicion and nothing accumulates over a long honest life.
A second CUSUM runs the same test on *flips* (greedy tokens other than the reference's top choice but
inside the tolerance; q0, q1 = honest_flip_rate / cheat_flip_rate): a node that takes the runner-up whenever the
tolerance allows has no violations, only flips. The node's evidence level is the higher of the two.

False-conviction bound. Assumption: given everything before it, each token an honest node emits is a
violation with probability <= p0 (calibration sets p0 at `margin` x the worst measured honest rate of
heterogeneous nodes, and at least 3 / tokens measured). Then e^L has conditional mean <= 1 for every
completion, so from any start j the product of e^L is a nonnegative supermartingale and, by Ville's
inequality, P(sum of L from j ever >= A) <= e^-A. CUSUM crosses A only if some start j does, so over a
node's first K completions P(conviction) <= K e^-A. With at most M completions verified per node per
epoch by one validator (M = max_completions_per_epoch, 2^14 by default: 11 a minute through a whole
day), A = ln(M / (alpha / 2)) gives each test P(convicted within its first E epochs) <= E x alpha / 2,
the two together E x alpha: alpha = 5e-7 per node per epoch, A = ln(2^14 / 2.5e-7) = 24.9 (the flip test's
assumption is the same with q0: measured honest flip rates are 1.6-1.8%, q0 is 5%). The per-completion fraud rule of `scoring.verify` spends the
other 5e-7 (fraud_alpha 3e-11 x 2^14), so an honest node is convicted with probability <= 1e-6 per
node per epoch. Detection: a cheat at rate p1 adds KL(p1 || p0) nats per token on average (0.07 at
p0 0.005, p1 0.05: about 340 tokens, 5-6 challenges of ~64 tokens); another model violates most of its
tokens and is fraud at its first completion of a few tokens. A flipper at 26% adds 0.23 nats per token
to the flip test (q0 0.05, q1 0.2): about 110 tokens; an honest node at 1.8% loses 0.14 per token.

Conviction and recovery (Petals' rule: penalise, back off, clear on success). A conviction (S reaches A)
or a fraud verdict sets integrity to 0 and S to A (1 + 2^(k-1)) for the node's k-th conviction (k capped
at 6): the node stays at 0 until honest evidence has brought S back under A - about A 2^(k-1) / 0.046
clean tokens, ~530 for a first conviction - and then regains integrity smoothly as S falls to 0.
A single odd completion cannot convict: its L is at most n ln(p1/p0), and a completion that alone
reaches A is far beyond honest noise (fraud_alpha).

All EMAs start at the first observation (no prior). A node without a verdict yet has no score: answered
or failed challenges alone say nothing about which model it serves, and a score of 0 would read as
"caught" to consensus and settlement (an honest node whose first verification is still queued would
then earn nothing for the epoch).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from cluster.records import NodeScore
from scoring.verify import Evidence, Verdict, Verification


class ScoreConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    availability_alpha: float = Field(default=0.2, gt=0, le=1, description="EMA rate of challenge success.")
    speed_alpha: float = Field(default=0.3, gt=0, le=1, description="EMA rate of TTFT and tokens/s.")
    w_avail: float = Field(
        default=0.7, ge=0, le=1, description="Weight of availability vs speed (1 - w_avail) inside the score."
    )
    alpha: float = Field(
        default=5e-7,
        gt=0,
        lt=1,
        description="Largest probability that the sequential test convicts an honest node per epoch.",
    )
    max_completions_per_epoch: int = Field(
        default=2**14,
        ge=1,
        description="Assumed bound on completions one validator verifies per node per epoch; the "
        "conviction threshold is ln(this / alpha).",
    )
    max_backoff_doublings: int = Field(
        default=5,
        ge=0,
        le=20,
        description="Repeat convictions double the clean evidence needed to leave the penalty, up to "
        "2^this times the threshold.",
    )

    @property
    def threshold(self) -> float:
        """A: the CUSUM level at which a node is convicted (nats); the two tests (violations, flips) share
        `alpha`, half each."""
        return math.log(self.max_completions_per_epoch / (self.alpha / 2))


@dataclass
class _NodeState:
    model_id: str
    integrity_seen: bool = False  # a verification has arrived (no verdict, no score)
    llr: float = 0.0  # CUSUM statistic S >= 0 of violations
    flip_llr: float = 0.0  # CUSUM statistic of flips (non-top tokens inside the tolerance)
    flips: int = 0
    convicted: bool = False  # in penalty: integrity 0 until S < A again
    convictions: int = 0
    availability: float | None = None
    ttft: float | None = None
    tps: float | None = None
    verifications: int = 0
    tokens: int = 0
    violations: int = 0
    frauds: int = 0
    at: float = 0.0


def _level(st: _NodeState) -> float:
    """The evidence against a node: the higher of its two CUSUM statistics."""
    return max(st.llr, st.flip_llr)


def _ema(old: float | None, x: float, a: float) -> float:
    return x if old is None else a * x + (1 - a) * old


class NodeScorer:
    """Score state of one validator; pure (time is passed in), so unit tests need no clock."""

    def __init__(self, validator: str, config: ScoreConfig | None = None) -> None:
        self.validator = validator
        self.config = config or ScoreConfig()
        self._nodes: dict[str, _NodeState] = {}

    def _node(self, node_id: str, model_id: str) -> _NodeState:
        st = self._nodes.get(node_id)
        if st is None:
            st = self._nodes[node_id] = _NodeState(model_id)
        return st

    def observe_challenge(
        self,
        node_id: str,
        model_id: str,
        ok: bool,
        ttft_s: float | None = None,
        tokens_per_s: float | None = None,
        now: float | None = None,
    ) -> None:
        """A challenge request finished: `ok` if the node answered with a well-formed completion."""
        c, st = self.config, self._node(node_id, model_id)
        st.availability = _ema(st.availability, 1.0 if ok else 0.0, c.availability_alpha)
        if ok and ttft_s is not None and ttft_s > 0:
            st.ttft = _ema(st.ttft, ttft_s, c.speed_alpha)
        if ok and tokens_per_s is not None and tokens_per_s > 0:
            st.tps = _ema(st.tps, tokens_per_s, c.speed_alpha)
        st.at = time.time() if now is None else now

    def observe_verification(
        self,
        node_id: str,
        model_id: str,
        evidence: Evidence | Verification | Verdict,
        now: float | None = None,
    ) -> None:
        """One verified completion: its `Evidence` (a `Verification` gives its own; a bare verdict
        string is read by `Evidence.of_verdict`)."""
        if isinstance(evidence, Verification):
            evidence = evidence.evidence
        elif isinstance(evidence, str):
            evidence = Evidence.of_verdict(evidence)
        c, st = self.config, self._node(node_id, model_id)
        st.verifications += 1
        st.tokens += evidence.tokens
        st.violations += evidence.violations
        st.flips += evidence.flips
        st.integrity_seen = True
        st.at = time.time() if now is None else now
        a = c.threshold
        st.llr = max(0.0, st.llr + evidence.llr)
        st.flip_llr = max(0.0, st.flip_llr + evidence.flip_llr)
        if evidence.fraud or (not st.convicted and _level(st) >= a):
            st.frauds += evidence.fraud
            st.convictions += 1
            doublings = min(st.convictions - 1, c.max_backoff_doublings)
            st.llr = max(st.llr, a * (1 + 2**doublings))
            st.convicted = True
        elif st.convicted and _level(st) < a:
            st.convicted = False

    def in_penalty(self, node_id: str) -> bool:
        """Convicted and not yet cleared by honest evidence (integrity 0)."""
        st = self._nodes.get(node_id)
        return st is not None and st.convicted

    def evidence_level(self, node_id: str) -> tuple[float, float]:
        """(S, A): the node's CUSUM statistic and the conviction threshold, for audits and metrics."""
        st = self._nodes.get(node_id)
        return (0.0 if st is None else _level(st), self.config.threshold)

    def _integrity(self, st: _NodeState) -> float:
        if st.convicted:
            return 0.0
        return max(0.0, 1.0 - (_level(st) / self.config.threshold) ** 2)

    def _speed(self, st: _NodeState) -> float | None:
        peers = [s for s in self._nodes.values() if s.model_id == st.model_id]
        ttfts = [s.ttft for s in peers if s.ttft is not None]
        tpss = [s.tps for s in peers if s.tps is not None]
        parts = []
        if st.ttft is not None and ttfts:
            parts.append(min(1.0, statistics.median(ttfts) / st.ttft))
        if st.tps is not None and tpss:
            parts.append(min(1.0, st.tps / statistics.median(tpss)))
        return sum(parts) / len(parts) if parts else None

    def scores(self) -> list[NodeScore]:
        """Current NodeScore of every node this validator has a verdict on (see the module doc)."""
        c = self.config
        out = []
        for node_id, st in self._nodes.items():
            if not st.integrity_seen:  # no verdict yet: no opinion, not a zero
                continue
            integrity = self._integrity(st)
            availability, speed = st.availability, self._speed(st)
            parts = [(w, x) for w, x in ((c.w_avail, availability), (1 - c.w_avail, speed)) if x is not None]
            weight = sum(w for w, _ in parts)
            score = integrity * (sum(w * x for w, x in parts) / weight if weight > 0 else 1.0)
            out.append(
                NodeScore(
                    validator=self.validator,
                    node_id=node_id,
                    integrity=_unit(integrity),
                    availability=None if availability is None else _unit(availability),
                    speed=None if speed is None else _unit(speed),
                    score=_unit(score),
                    at=float(st.at),
                )
            )
        return out


def _unit(x: float) -> float:
    return float(min(1.0, max(0.0, x)))

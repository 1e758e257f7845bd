"""One validator's score of each node, in [0, 1], from what its challenges and verifications observed.

    integrity    = 0                                  if the node is in penalty (see below)
                 = EMA_a(pass=1, fail=0)              otherwise           (a = integrity_alpha)
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

Penalty (the "hard drop on clear fraud"): a `fraud` verdict, or `fail_strikes` failures among the last
`strike_window` verifications, sets integrity to 0 and keeps it there until `recovery_passes`
consecutive passes; afterwards the EMA restarts from 0, so trust is re-earned slowly. Honest nodes never
fail at calibrated thresholds (zero false positives measured), so strikes only hit dishonest nodes.

All EMAs start at the first observation (no prior). A node without a verdict yet has no score: answered
or failed challenges alone say nothing about which model it serves, and a score of 0 would read as
"caught" to consensus and settlement (an honest node whose first verification is still queued would
then earn nothing for the epoch).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from cluster.records import NodeScore
from scoring.verify import Verdict


class ScoreConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    integrity_alpha: float = Field(
        default=0.2, gt=0, le=1, description="EMA rate of the verification pass rate."
    )
    availability_alpha: float = Field(default=0.2, gt=0, le=1, description="EMA rate of challenge success.")
    speed_alpha: float = Field(default=0.3, gt=0, le=1, description="EMA rate of TTFT and tokens/s.")
    w_avail: float = Field(
        default=0.7, ge=0, le=1, description="Weight of availability vs speed (1 - w_avail) inside the score."
    )
    fail_strikes: int = Field(default=2, ge=1, description="Fails within the window that count as fraud.")
    strike_window: int = Field(
        default=16, ge=1, description="Verifications the fail strikes are counted over."
    )
    recovery_passes: int = Field(
        default=32, ge=0, description="Consecutive passes needed to leave the penalty after a drop."
    )


@dataclass
class _NodeState:
    model_id: str
    integrity: float | None = None
    availability: float | None = None
    ttft: float | None = None
    tps: float | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # recent verdicts
    penalty_left: int = 0  # passes still needed to leave the penalty
    verifications: int = 0
    frauds: int = 0
    at: float = 0.0


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
        self, node_id: str, model_id: str, verdict: Verdict, now: float | None = None
    ) -> None:
        c, st = self.config, self._node(node_id, model_id)
        st.verifications += 1
        st.recent.append(verdict)
        st.at = time.time() if now is None else now
        window = list(st.recent)[-c.strike_window :]
        if verdict == "fraud" or (verdict == "fail" and window.count("fail") >= c.fail_strikes):
            st.frauds += verdict == "fraud"
            st.penalty_left = max(c.recovery_passes, 1)
            st.integrity = 0.0
            st.recent.clear()
            return
        if st.penalty_left > 0:
            st.penalty_left = st.penalty_left - 1 if verdict == "pass" else max(c.recovery_passes, 1)
            if st.penalty_left > 0:
                return
        st.integrity = _ema(st.integrity, 1.0 if verdict == "pass" else 0.0, c.integrity_alpha)

    def in_penalty(self, node_id: str) -> bool:
        st = self._nodes.get(node_id)
        return st is not None and st.penalty_left > 0

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
            if st.integrity is None:  # no verdict yet: no opinion, not a zero
                continue
            integrity = 0.0 if st.penalty_left > 0 else st.integrity
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

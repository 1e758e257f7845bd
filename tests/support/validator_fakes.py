"""Fake validator actors for the consensus actor (scoring.consensus_service.ConsensusService) without Ray."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

from cluster.records import NodeScore
from scoring.report import ScoreReport, sign_report


def node_scores(validator: str, weights: dict[str, float], at: float) -> tuple[NodeScore, ...]:
    """A validator's scores with `score` (its weight) set per node."""
    return tuple(
        NodeScore(
            validator=validator,
            node_id=n,
            integrity=1.0 if w > 0 else 0.0,
            availability=1.0,
            speed=w,
            score=w,
            at=at,
        )
        for n, w in weights.items()
    )


class FakeValidatorActor:
    """Answers `report.remote(round)` as a Ray handle would (awaitable), signing with `key` the weights
    `weights(round)` returns: a validator's whole strategy in one function."""

    def __init__(self, key, validator: str, weights: Callable[[int], dict[str, float]]) -> None:
        self._key, self._validator, self._weights = key, validator, weights
        self.report = SimpleNamespace(remote=self._report)

    async def _report(self, round_: int) -> str:
        now = time.time()
        report = ScoreReport(
            validator=self._validator,
            round=round_,
            issued_at_ms=int(now * 1000),
            scores=node_scores(self._validator, self._weights(round_), now),
        )
        return sign_report(report, self._key).model_dump_json()

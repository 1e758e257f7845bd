"""Validators are paid by their Yuma dividends: bonds reward scoring a node early over copying late.

Hand-worked example (kappa 0.5, alpha 0.1, bonds from clipped weights as in subtensor):
three validators A, B, C with equal stake (1/3 each), two nodes x and y.

Round 1. A and C weight x and y equally (rows 1/2, 1/2); B has only scored y (row 0, 1).
  consensus: x -> 1/2 (A and C, 2/3 of the stake, weight it >= 1/2); y -> 1/2.
  clipped:   A (1/2, 1/2), C (1/2, 1/2), B (0, 1/2).
  bonds:     column-normalised stake x clipped: x -> A 1/2, B 0, C 1/2; y -> 1/3 each.
  incentive: rank x = (1/2 + 1/2)/3 = 1/3, y = 3/2 / 3 = 1/2; normalised x 2/5, y 3/5.
  dividends: A = 1/2 x 2/5 + 1/3 x 3/5 = 2/5; B = 0 + 1/5 = 1/5; C = 2/5.
Round 2. B copies A: every row is (1/2, 1/2); consensus 1/2 each, nothing clipped; incentive 1/2 each.
  Original Yuma (`yuma_epoch` without `public`): delta bonds 1/3 each in both columns;
  x bonds = 0.1 x 1/3 + 0.9 x (1/2, 0, 1/2) = A 29/60, B 1/30, C 29/60; y stays 1/3 each.
  dividends: A = 1/2 x 29/60 + 1/2 x 1/3 = 49/120; B = 1/2 x 1/30 + 1/6 = 22/120; C = 49/120.
  `ConsensusState` (bonds bought only above what was published, scoring.consensus "Copying"):
  round 1 published x and y at quality 1, the row (1/2, 1/2), and round 2's consensus is exactly
  that: nothing in it was news, no bond changes hands. x bonds stay (1/2, 0, 1/2), y 1/3 each.
  dividends: A = 1/2 x 1/2 + 1/2 x 1/3 = 50/120; B = 0 + 1/6 = 20/120; C = 50/120.
B now weights exactly as A does, yet earns 20/120 against A's 50/120: copying what the network
already published buys no bond on x. With a validator pool of 1,200 wei that is A 500, B 200, C 500.
"""

from __future__ import annotations

import pytest

from cluster.records import NodeScore
from scoring import ConsensusState
from scoring.consensus import yuma_epoch
from settlement.rewards import split_by_weight, validator_pool


def _scores(validator: str, weights: dict[str, float]) -> list[NodeScore]:
    return [
        NodeScore(validator=validator, node_id=n, integrity=1.0, availability=1.0, speed=w, score=w, at=0.0)
        for n, w in weights.items()
    ]


def test_dividends_follow_bonds_as_worked_by_hand():
    state = ConsensusState({"A": 1.0, "B": 1.0, "C": 1.0})
    both = {"x": 1.0, "y": 1.0}
    state.step({"A": _scores("A", both), "B": _scores("B", {"y": 1.0}), "C": _scores("C", both)}, now=0.0)
    assert state.dividends() == pytest.approx({"A": 2 / 5, "B": 1 / 5, "C": 2 / 5}, abs=1e-12)
    bonds = state.last.bonds
    assert bonds[:, 0] == pytest.approx([1 / 2, 0, 1 / 2], abs=1e-12)  # column x; rows A, B, C
    assert bonds[:, 1] == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=1e-12)

    # Original Yuma on round 2's weights with round 1's bonds: the copier's bond on x grows.
    same = [[1.0, 1.0]] * 3
    yuma = yuma_epoch(same, [1.0, 1.0, 1.0], bonds)
    assert yuma.bonds[:, 0] == pytest.approx([29 / 60, 1 / 30, 29 / 60], abs=1e-12)
    assert yuma.dividends == pytest.approx([49 / 120, 22 / 120, 49 / 120], abs=1e-12)

    state.step({v: _scores(v, both) for v in ("A", "B", "C")}, now=1.0)  # B copies A
    assert state.last.weights[0] == pytest.approx(state.last.weights[1])  # the same weights now
    assert state.last.bonds[:, 0] == pytest.approx([1 / 2, 0, 1 / 2], abs=1e-12)  # nothing was news
    assert state.last.fresh == pytest.approx([0.0, 0.0])
    dividends = state.dividends()
    assert dividends == pytest.approx({"A": 50 / 120, "B": 20 / 120, "C": 50 / 120}, abs=1e-12)
    assert dividends["A"] > dividends["B"]  # early scoring earns more than late copying

    # Paid out exactly: the pool splits by dividend with nothing lost or created.
    assert split_by_weight(dividends, 1200) == {"A": 500, "B": 200, "C": 500}


def test_a_validator_whose_scores_are_clipped_away_earns_nothing_from_that_node():
    # A minority validator vouching alone for a node the majority weights 0 holds no bond on it.
    w = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    r = yuma_epoch(w, [1.0, 1.0, 1.0])
    assert r.bonds[2, 1] == 0.0 and r.dividends[2] == 0.0
    assert r.dividends[0] == pytest.approx(0.5) and r.dividends[1] == pytest.approx(0.5)


def test_dividends_are_empty_before_the_first_round_and_cover_every_configured_validator():
    state = ConsensusState({"A": 2.0, "B": 1.0})
    assert state.dividends() == {}
    state.step({"A": _scores("A", {"x": 1.0})}, now=0.0)  # B does not answer
    assert set(state.dividends()) == {"A", "B"} and state.dividends()["B"] == 0.0
    assert sum(state.dividends().values()) == pytest.approx(1.0)


def test_split_by_weight_is_exact_and_refuses_bad_weights():
    parts = split_by_weight({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10)
    assert sum(parts.values()) == 10 and sorted(parts.values()) == [3, 3, 4]
    assert split_by_weight({"a": 0.0}, 10) == {} and split_by_weight({}, 10) == {}
    assert split_by_weight({"a": 1.0, "b": 0.0}, 7) == {"a": 7}
    for bad in (float("nan"), float("inf"), -1.0, True):
        with pytest.raises(ValueError):
            split_by_weight({"a": bad}, 10)


def test_validator_pool_is_the_configured_share_only_when_someone_holds_a_dividend():
    assert validator_pool(1000, 2000, {"a": 0.5}) == 200
    assert validator_pool(999, 2000, {"a": 0.5}) == 199  # floored: the operators get the odd wei
    assert validator_pool(1000, 2000, {}) == 0 and validator_pool(1000, 2000, {"a": 0.0}) == 0
    assert validator_pool(1000, 10_000, {"a": 1.0}) == 1000
    with pytest.raises(ValueError):
        validator_pool(1000, 10_001, {"a": 1.0})

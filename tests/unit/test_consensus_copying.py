"""Issue 28 item 14: a validator that copies the published consensus one round late earns nothing.

Three honest validators see a changing network (speeds drift, nodes join, a cheater is caught), each
with a little noise of its own; a fourth, the copier, runs no reference engine and sends, each round,
the quality the previous round published (`/status.json`, `/metrics`). Original Yuma pays the copier
about its stake share; `ConsensusState` buys bonds only with support that was not yet public
(scoring.consensus, "Copying"), so the copier's dividends stay at 0 and the honest validators share
them."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from eth_account import Account

from scoring import ConsensusState
from scoring.consensus import SavedBonds, yuma_epoch
from scoring.consensus_service import ConsensusService
from tests.support.validator_fakes import FakeValidatorActor, node_scores

HONEST = ("h1", "h2", "h3")
ROUNDS = 24
UNIVERSE = ["a", "b", "c", *(f"n{k}" for k in range(3, ROUNDS, 4))]


def changing(k: int) -> dict[str, float]:
    """What a careful validator measures in round k: speeds drift, a node joins every 4 rounds, c is
    caught cheating in round 10."""
    truth = {"a": 0.6 + 0.3 * math.sin(k / 3), "b": 0.5 + 0.2 * math.cos(k / 5), "c": 0.9 if k < 10 else 0.0}
    truth |= {f"n{j}": 0.4 + 0.05 * (k - j) for j in range(3, k + 1, 4) if k - j < 8}
    truth |= {f"n{j}": 0.8 for j in range(3, k + 1, 4) if k - j >= 8}
    return truth


def steady(_k: int) -> dict[str, float]:
    return {"a": 0.9, "b": 0.6, "c": 0.3}


def honest_view(validator: str, truth: dict[str, float], k: int) -> dict[str, float]:
    """The truth with this validator's own measurement noise (a few percent, deterministic)."""
    i = HONEST.index(validator)
    return {n: min(1.0, max(0.0, q + 0.02 * math.sin(7 * k + 3 * i + len(n)))) for n, q in truth.items()}


def run(world) -> tuple[dict[str, float], np.ndarray]:
    """Dividends per validator averaged over rounds 2.. (the copier has nothing to copy in round 1),
    with this design and, for the same weights, with original Yuma's bonds."""
    state = ConsensusState(dict.fromkeys([*HONEST, "copier"], 1.0))
    published: dict[str, float] = {}
    ours, yuma = [], []
    yuma_bonds = None
    for k in range(1, ROUNDS + 1):
        t = float(k)
        scores = {v: node_scores(v, honest_view(v, world(k), k), t) for v in HONEST}
        scores["copier"] = node_scores("copier", published, t)  # last round's quality, as published
        published = state.step(scores, node_ids=UNIVERSE, now=t).quality
        r = yuma_epoch(state.last.weights, state.last.stake, yuma_bonds)
        yuma_bonds = r.bonds
        if k >= 2:
            ours.append([state.dividends()[v] for v in state.validators])
            yuma.append(r.dividends)
    mean = np.mean(ours, axis=0)
    return dict(zip(state.validators, mean)), np.mean(yuma, axis=0)


@pytest.mark.parametrize("world", [changing, steady])
def test_a_validator_that_copies_the_published_consensus_earns_nothing(world):
    ours, yuma = run(world)
    copier = ["copier", *HONEST].index("copier")  # validators are sorted: "copier" comes first
    assert yuma[copier] > 0.1  # original Yuma: the copier's bonds grow toward its stake share (1/4)
    assert ours["copier"] < 1e-6, ours
    for v in HONEST:
        assert ours[v] == pytest.approx(1 / 3, abs=0.05), ours
    assert sum(ours.values()) == pytest.approx(1.0)


def test_fresh_support_is_what_was_not_public():
    """yuma_epoch's `public`: the row a copier of the last published consensus sends. A validator at
    that row buys no bond; one that backed a node nobody had published buys it all."""
    w = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    prev = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [0.5, 0.5, 0.0]]  # row 0 and 3 bonded
    r = yuma_epoch(w, [1, 1, 1, 1], prev, public=[0.5, 0.5, 0.0])
    # x and y: their consensus (1/3 each, the rows being thirds) is below what was public: no trade
    assert r.fresh[:2] == pytest.approx([0.0, 0.0])
    assert r.bonds[:, 0] == pytest.approx([0.5, 0.0, 0.0, 0.5])
    # z was not public: h2 and h3 (rows 1, 2) back it first and take its bonds, as in original Yuma
    assert r.fresh[2] == pytest.approx(1.0)
    assert r.bonds[:, 2] == pytest.approx(yuma_epoch(w, [1, 1, 1, 1], prev).bonds[:, 2])
    assert r.bonds[0, 2] == r.bonds[3, 2] == 0.0
    # without `public` it is original Yuma: every validator's support buys bonds
    assert (yuma_epoch(w, [1, 1, 1, 1], prev).bonds[1:3, 0] > 0).all()
    with pytest.raises(ValueError, match="public"):
        yuma_epoch(w, [1, 1, 1, 1], prev, public=[0.5, 0.5])
    with pytest.raises(ValueError, match="public"):
        yuma_epoch(w, [1, 1, 1, 1], prev, public=[float("nan"), 0.5, 0.0])


def test_what_was_published_survives_a_restart_and_old_bond_files_still_load():
    state = ConsensusState({"h1": 1.0, "h2": 1.0})
    state.step({v: node_scores(v, {"a": 1.0, "b": 0.5}, 0.0) for v in ("h1", "h2")}, now=0.0)
    saved = state.saved()
    assert dict(saved.public) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    again = ConsensusState({"h1": 1.0, "h2": 1.0})
    again.restore(SavedBonds.model_validate_json(saved.model_dump_json()))
    assert again.saved() == saved
    old = SavedBonds.model_validate_json('{"epoch": 3, "bonds": [["h1", "a", 0.5]]}')
    assert old.public == []
    with pytest.raises(ValueError):
        SavedBonds.model_validate_json('{"epoch": 3, "bonds": [], "public": [["a", 1.5]]}')


async def test_through_the_consensus_actor_with_signed_reports():
    """The same through the consensus service: signed reports, the copier reading `latest()`."""
    keys = {v: Account.create() for v in (*HONEST, "copier")}

    def honest(v):
        return lambda r: honest_view(v, changing(r), r)

    stakes = dict.fromkeys(keys, 1.0)
    svc: ConsensusService

    def copy(_r):
        latest = svc._latest
        return {} if latest is None else dict(latest.quality)

    actors = {v: FakeValidatorActor(keys[v], v, honest(v)) for v in HONEST}
    actors["copier"] = FakeValidatorActor(keys["copier"], "copier", copy)
    svc = ConsensusService(
        stakes,
        {v: k.address for v, k in keys.items()},
        period_s=1.0,
        epoch_length_s=1e9,
        genesis=0.0,
        activity_cutoff_s=None,
        actor_of=actors.__getitem__,
    )
    for _ in range(8):
        assert await svc.step() is not None
    dividends = svc._state.dividends()
    assert dividends["copier"] < 1e-6 and min(dividends[v] for v in HONEST) > 0.25, dividends
    paid = svc.epochs.mean_dividends(svc.epochs.epoch_of(time.time()))  # what settlement is sent
    assert paid[keys["copier"].address] < 1e-6 and paid[keys["h1"].address] > 0.25

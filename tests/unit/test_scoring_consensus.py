"""Yuma Consensus: worked examples checked by hand, and the minority-cannot-lift property."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.consensus import quality_from_consensus, weighted_median, yuma_epoch


def test_three_validators_two_nodes_worked_example():
    # Stake 45/35/20 -> S = [0.45, 0.35, 0.20]. Rows already sum to 1.
    # Validator C (20%) is colluding with node 1 and gives it all of its weight.
    w = [[0.8, 0.2], [0.6, 0.4], [0.0, 1.0]]
    r = yuma_epoch(w, [45, 35, 20])
    # consensus_0: largest v with stake(w >= v) >= 0.5: v=0.8 -> 0.45 (no); v=0.6 -> 0.80 (yes) => 0.6
    # consensus_1: v=1.0 -> 0.20 (no); v=0.4 -> 0.55 (yes) => 0.4   (C cannot lift node 1 above 0.4)
    np.testing.assert_allclose(r.consensus, [0.6, 0.4])
    # clipped W' = min(W, consensus): A [0.6, 0.2], B [0.6, 0.4], C [0.0, 0.4]
    np.testing.assert_allclose(r.clipped_weights, [[0.6, 0.2], [0.6, 0.4], [0.0, 0.4]])
    # validator trust = row sums of W': A 0.8, B 1.0, C 0.4
    np.testing.assert_allclose(r.validator_trust, [0.8, 1.0, 0.4])
    # prerank = S.W : n0 = .45*.8 + .35*.6 = 0.57 ; n1 = .45*.2 + .35*.4 + .2*1 = 0.43
    # rank = S.W'   : n0 = .45*.6 + .35*.6 = 0.48 ; n1 = .45*.2 + .35*.4 + .2*.4 = 0.31
    np.testing.assert_allclose(r.rank, [0.48, 0.31])
    np.testing.assert_allclose(r.trust, [0.48 / 0.57, 0.31 / 0.43])
    # incentive = rank / 0.79
    np.testing.assert_allclose(r.incentive, [0.48 / 0.79, 0.31 / 0.79])
    # delta B = S_i W'_ij / rank_j: n0 col [.27, .21, 0]/.48 ; n1 col [.09, .14, .08]/.31.
    # No previous bonds: EMA = 0.1 * delta, column-normalised again -> delta.
    np.testing.assert_allclose(
        r.bonds, [[0.27 / 0.48, 0.09 / 0.31], [0.21 / 0.48, 0.14 / 0.31], [0.0, 0.08 / 0.31]]
    )
    # dividends_i = sum_j B_ij inc_j = sum_j S_i W'_ij / 0.79: A .36/.79, B .35/.79, C .08/.79
    np.testing.assert_allclose(r.dividends, [0.36 / 0.79, 0.35 / 0.79, 0.08 / 0.79])


def test_bonds_ema_carries_history():
    # Two equal validators both weight the only node: delta = [0.5, 0.5].
    # Previous bonds [1, 0] (only A was bonded). EMA = 0.1*[.5,.5] + 0.9*[1,0] = [0.95, 0.05].
    r = yuma_epoch([[1.0], [1.0]], [1, 1], bonds=[[1.0], [0.0]])
    np.testing.assert_allclose(r.bonds, [[0.95], [0.05]])
    # incentive = [1]; dividends = bonds column = [0.95, 0.05]
    np.testing.assert_allclose(r.dividends, [0.95, 0.05])
    # alpha = 1 forgets history entirely
    np.testing.assert_allclose(
        yuma_epoch([[1.0], [1.0]], [1, 1], bonds=[[1.0], [0.0]], alpha=1.0).bonds, [[0.5], [0.5]]
    )


def test_rows_are_normalised_and_an_exact_half_stake_tie_takes_the_midpoint():
    # Rows [2, 2] and [3, 1] normalise to [.5, .5] and [.75, .25]; equal stake.
    r = yuma_epoch([[2, 2], [3, 1]], [1, 1])
    np.testing.assert_allclose(r.weights, [[0.5, 0.5], [0.75, 0.25]])
    # node 0: v=.75 has exactly 0.5 of the stake (a tie), v=.5 all of it -> (.75 + .5) / 2
    # node 1: v=.5 has exactly 0.5, v=.25 all of it -> (.5 + .25) / 2
    # (subtensor's tie rule gave .75 and .5: the validator weighting higher decided alone)
    np.testing.assert_allclose(r.consensus, [0.625, 0.375])
    # stakes that make an exact half only up to rounding are a tie too
    assert weighted_median(np.array([1 / 3, 1 / 6, 1 / 2]), np.array([1.0, 1.0, 0.0]), 0.5) == 0.5
    with pytest.raises(ValueError, match="kappa"):
        yuma_epoch([[1.0]], [1], kappa=1.0)


def test_weighted_median_examples():
    s = np.array([0.2, 0.3, 0.5])
    x = np.array([0.9, 0.5, 0.1])
    # stake at or above each value: >=.9 -> .2 ; >=.5 -> .2+.3 = .5 ; >=.1 -> 1.0
    assert weighted_median(s, x, 0.5) == pytest.approx(0.3)  # .5 is exactly kappa: midpoint of .5 and .1
    assert weighted_median(s, x, 0.49) == 0.5
    assert weighted_median(s, x, 0.6) == 0.1
    assert weighted_median(s, x, 0.2) == pytest.approx(0.7)  # .9 has exactly .2: midpoint of .9 and .5
    assert weighted_median(s, x, 0.19) == 0.9
    assert weighted_median(np.zeros(3), x, 0.5) == 0.0


def test_zero_weights_and_bad_input():
    r = yuma_epoch(np.zeros((2, 3)), [1, 1])
    assert r.incentive.sum() == 0 and r.consensus.sum() == 0
    with pytest.raises(ValueError, match="bonds"):
        yuma_epoch([[1.0]], [1], bonds=[[1.0, 0.0]])
    with pytest.raises(ValueError, match="stake"):
        yuma_epoch([[1.0]], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        yuma_epoch([[-1.0]], [1])
    with pytest.raises(ValueError):
        r.consensus[0] = 1.0  # read-only result


def test_quality_from_consensus_scales_best_node_to_one():
    r = yuma_epoch([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.0, 1.0, 0.0]], [45, 35, 20])
    q = quality_from_consensus(r, ["a", "b", "c"], epoch=7)
    assert q.epoch == 7
    assert q.quality == pytest.approx({"a": 1.0, "b": 0.4 / 0.6, "c": 0.0})
    with pytest.raises(ValueError, match="node ids"):
        quality_from_consensus(r, ["a"])
    empty = quality_from_consensus(yuma_epoch(np.zeros((1, 2)), [1]), ["a", "b"])
    assert empty.quality == {"a": 0.0, "b": 0.0}


@st.composite
def _network(draw):
    n_honest = draw(st.integers(1, 5))
    n_bad = draw(st.integers(1, 3))
    n_nodes = draw(st.integers(1, 4))
    kappa = draw(st.sampled_from([0.5, 0.51, 0.6, 0.67]))
    honest_stake = draw(st.lists(st.integers(1, 100), min_size=n_honest, max_size=n_honest))
    coalition_frac = draw(st.floats(0.0, 0.99)) * kappa  # strictly less than kappa of all stake
    total_honest = sum(honest_stake)
    coalition_total = total_honest * coalition_frac / (1 - coalition_frac)
    split = draw(st.lists(st.integers(1, 10), min_size=n_bad, max_size=n_bad))
    bad_stake = [coalition_total * k / sum(split) for k in split]
    cell = st.floats(0.0, 1.0, allow_nan=False)
    honest_w = draw(
        st.lists(st.lists(cell, min_size=n_nodes, max_size=n_nodes), min_size=n_honest, max_size=n_honest)
    )
    bad_w = draw(st.lists(st.lists(cell, min_size=n_nodes, max_size=n_nodes), min_size=n_bad, max_size=n_bad))
    return kappa, np.array(honest_stake, float), np.array(bad_stake), np.array(honest_w), np.array(bad_w)


@settings(max_examples=200, deadline=None)
@given(_network())
def test_minority_coalition_cannot_lift_consensus_above_majority(net):
    kappa, hs, bs, hw, bw = net
    r = yuma_epoch(np.vstack([hw, bw]), np.concatenate([hs, bs]), kappa=kappa)
    total = hs.sum() + bs.sum()
    c = bs.sum() / total
    assert c < kappa
    hwn = np.divide(
        hw, hw.sum(axis=1, keepdims=True), out=np.zeros_like(hw), where=hw.sum(axis=1, keepdims=True) > 0
    )
    for j in range(hw.shape[1]):
        # The most the coalition can achieve: it backs any value with all c of its stake, so a value v
        # needs honest stake (as a share of all stake) >= kappa - c at or above v.
        # The bound is the largest such honest value (0 if none).
        ok = [v for v in hwn[:, j] if hs[hwn[:, j] >= v].sum() / total + c >= kappa - 1e-9]
        bound = max(ok, default=0.0)
        assert r.consensus[j] <= bound + 1e-9
        # and in particular never above the largest weight any honest validator set
        assert r.consensus[j] <= hwn[:, j].max() + 1e-9

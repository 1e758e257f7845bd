"""benchmarks.fleet on a tiny fleet: every policy runs on the same world, and meritnet, driving the
real Router, stops serving dishonest nodes once validators caught them."""

from __future__ import annotations

import yaml

from benchmarks.fleet import DEFAULT_SCENARIO, POLICIES, Scenario, Sim

KEYS = {"p50_ms", "p99_ms", "goodput_tok_s", "dishonest_share"}


def tiny() -> Scenario:
    raw = yaml.safe_load(DEFAULT_SCENARIO.read_text())
    raw.update(
        nodes=10,
        dishonest_fraction=0.2,
        duration_s=160.0,
        quick_duration_s=160.0,
        warmup_s=100.0,
        drain_s=20.0,
        mtbf_s=120.0,
    )
    return Scenario.model_validate(raw)


def test_every_policy_reports_the_keys_and_meritnet_avoids_caught_cheaters():
    sc = tiny()
    results = {name: Sim(sc, name, sc.duration_s).run() for name in POLICIES}
    for r in results.values():
        assert KEYS <= set(r) and r["completed"] > 0
    assert results["meritnet"]["dishonest_share"] == 0.0
    assert results["random"]["dishonest_share"] > 0.01  # 2 of 10 nodes cheat: chance alone finds them


def test_same_seed_same_world():
    sc = tiny()
    assert Sim(sc, "round-robin", 120.0).run() == Sim(sc, "round-robin", 120.0).run()

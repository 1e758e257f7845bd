"""benchmarks.fleet's KV prefix cache model and honest oracles."""

from __future__ import annotations

import yaml

from benchmarks.fleet import DEFAULT_SCENARIO, Node, Scenario, Sim, Tier, cached_blocks, touch_blocks

TIER = Tier(name="L4", speed=1.0, capacity=1, share=1.0)


def test_only_a_leading_run_of_blocks_hits_and_the_lru_evicts_the_oldest():
    node = Node("n", TIER, True, 0.9, 0.9)
    touch_blocks(node, (1, 2, 3), limit=4)
    assert cached_blocks(node, (1, 2, 3, 4)) == 3
    assert cached_blocks(node, (9, 2, 3)) == 0  # block 2's KV depends on block 1's: no hit without it
    touch_blocks(node, (1, 7), limit=4)  # 1 refreshed, 7 added: 2 is now the oldest
    touch_blocks(node, (8,), limit=4)
    assert list(node.cache) == [3, 1, 7, 8]
    assert cached_blocks(node, (1, 2, 3)) == 1


def shared_prefix_tiny(**over) -> Scenario:
    raw = yaml.safe_load(DEFAULT_SCENARIO.read_text())
    raw.update(
        nodes=6,
        dishonest_fraction=0.34,
        duration_s=140.0,
        quick_duration_s=140.0,
        warmup_s=100.0,
        drain_s=20.0,
        shared_prefix_fraction=1.0,
        shared_prefixes=2,
        shared_prefix_tokens=4000,
    )
    raw.update(over)
    return Scenario.model_validate(raw)


def test_prefix_cache_hits_cut_ttft_and_oracles_never_use_cheaters():
    sc = shared_prefix_tiny()
    warm = Sim(sc, "oracle-least-loaded", sc.duration_s).run()
    cold = Sim(shared_prefix_tiny(cache_blocks_per_slot=0), "oracle-least-loaded", sc.duration_s).run()
    # 4,000 shared tokens take 2 s to prefill on a 1x node; two prompts fit every node's cache.
    assert warm["ttft_p50_ms"] < cold["ttft_p50_ms"] / 2
    for name in ("oracle-least-loaded", "oracle-power-of-two"):
        assert Sim(sc, name, sc.duration_s).run()["dishonest_share"] == 0.0
    assert Sim(sc, "least-loaded", sc.duration_s).run()["dishonest_share"] > 0.0

"""benchmarks.overhead's pure part: usage records and counters -> the measured validator overhead."""

from __future__ import annotations

import json

import pytest

from benchmarks.overhead import (
    DEFINITIONS,
    METER_KEYS,
    MeteredEngine,
    Observations,
    _meter_reference,
    cpu_delta,
    id_check,
    split,
    sum_samples,
    summarise,
    validator_totals,
)
from cluster.records import UsageRecord

OPERATOR = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
ORGANIC, WARM = "cfg-0000aaaa", "cfg-1111bbbb"


def rec(rid, key_id, started_at, prompt, completion, node="h100-a", status="ok") -> UsageRecord:
    return UsageRecord(
        request_id=rid,
        node_id=node,
        operator=OPERATOR,
        model="default",
        prompt_tokens=prompt,
        completion_tokens=completion,
        started_at=float(started_at),
        ended_at=float(started_at) + 1.0,
        status=status,
        key_id=key_id,
    )


# A 60 s window [100, 160): two organic requests (one cut off mid-stream: its tokens were still served),
# one challenge on each node, a challenge before and one after the window, a late warm-up request.
RECORDS = [
    rec("o1", ORGANIC, 101, 40, 60),
    rec("o2", ORGANIC, 159.5, 30, 20, node="l4-b", status="error"),
    rec("c1", "", 120, 20, 10),
    rec("c2", "", 150, 5, 5, node="l4-b"),
    rec("c-early", "", 99.9, 1000, 1000),
    rec("c-late", "", 160, 1000, 1000),
    rec("w1", WARM, 100.5, 7, 3),
]


def test_challenges_are_the_records_without_a_client_key_started_in_the_window():
    parts = split(RECORDS, ORGANIC, 100.0, 160.0)
    assert [r.request_id for r in parts["organic"]] == ["o1", "o2"]
    assert [r.request_id for r in parts["challenge"]] == ["c1", "c2"]
    assert [r.request_id for r in parts["unclassified"]] == ["w1"]


def test_client_ids_cross_check_the_split():
    parts = split(RECORDS, ORGANIC, 100.0, 160.0)
    ok = id_check(parts, ["o1", "o2"])
    assert ok["agrees"] and ok["recorded_as_organic"] == 2 and ok["client_ids_without_record"] == 0
    # a client request the gateway recorded without its key would be counted as a challenge
    bad = id_check(parts, ["o1", "c1", "lost"])
    assert not bad["agrees"]
    assert bad["recorded_as_challenge"] == 1
    assert bad["organic_records_not_from_client"] == 1
    assert bad["client_ids_without_record"] == 1


def observations(**over) -> Observations:
    base = {
        "records": RECORDS,
        "results": [
            {"ok": True, "rid": "o1", "error": None, "tokens": 100},
            {"ok": False, "rid": "o2", "error": "APIError", "tokens": 0},
            {"ok": False, "rid": None, "error": "APIConnectionError", "tokens": 0},
        ],
        "organic_key_id": ORGANIC,
        "start": 100.0,
        "end": 160.0,
        "read_at": 220.0,
        "nodes": 2,
        "challenge_rates": [0.5, 0.5, 0.5],
        "meter": {
            "calls": 3,
            "verifications": 4,
            "prompt_tokens": 60,
            "completion_tokens": 40,
            "busy_s": 12.0,
        },
        "validator_counters": {"challenges": 2, "pass": 2},
        "cpu_s": {
            "reference": {"default": 30.0},
            "nodes": {"h100-a/x": 100.0, "l4-b/y": 50.0},
            "validators": {},
        },
        "vllm_tokens": 3150.0,
    }
    return Observations(**{**base, **over})


def test_summarise_measures_the_overhead_from_the_ledger():
    out = summarise(observations())
    # challenge tokens (30 + 10) / organic tokens (100 + 50), every status counted
    assert out["validator_overhead_measured"] == pytest.approx(40 / 150)
    assert out["overhead"]["completion_tokens"] == pytest.approx(15 / 80)
    assert out["overhead"]["requests"] == pytest.approx(1.0)
    assert out["tokens"]["organic"]["by_status"] == {"error": 1, "ok": 1}
    assert out["tokens"]["challenge"]["by_node"] == {
        "h100-a": {"requests": 1, "tokens": 30},
        "l4-b": {"requests": 1, "tokens": 10},
    }
    assert out["goal"] == {"validator_overhead_measured_max": 0.05, "met": False}
    # 2 challenges over 2 nodes in 1 minute; configured: 3 validators x 0.5
    assert out["rates"]["challenges_per_node_per_min_measured"] == pytest.approx(1.0)
    assert out["rates"]["challenges_per_node_per_min_configured"] == pytest.approx(1.5)
    assert out["rates"]["organic_requests_per_s_per_node"] == pytest.approx(2 / 60 / 2)
    assert out["challenge_count_rel_stderr"] == pytest.approx(2**-0.5)
    # engine interval [100, 220): everything started in it but not c-early (c-late started at 160)
    assert out["engines"]["ledger_tokens"] == 150 + 40 + 2000 + 10
    assert out["reference_tokens_over_node_tokens"] == pytest.approx(100 / 2200)
    assert out["reference_cpu_over_node_cpu"] == pytest.approx(30 / 150)
    assert out["engines"]["reference"]["busy_share"] == pytest.approx(12 / 120)
    assert out["client"] == {
        "requests": 3,
        "ok": 1,
        "errors": {"APIError": 1, "APIConnectionError": 1},
        "usage_tokens": 100,
    }
    assert out["id_check"]["agrees"]
    json.dumps(out)  # plain JSON
    headline = [k for k in out if k.endswith(("_measured", "_over_node_tokens", "_over_node_cpu"))]
    assert len(headline) == 3 and all(k in DEFINITIONS for k in headline)


def test_no_organic_traffic_gives_no_ratio_rather_than_a_crash():
    out = summarise(observations(records=[rec("c1", "", 120, 20, 10)], results=[]))
    assert out["validator_overhead_measured"] is None and out["goal"]["met"] is None
    out = summarise(observations(records=[rec("o1", ORGANIC, 101, 40, 60)]))
    assert out["validator_overhead_measured"] == 0.0 and out["challenge_count_rel_stderr"] is None


def test_validator_counters_sum_over_validators_and_nodes():
    stats = [
        {"h100-a": {"challenges": 2, "answered": 2, "pass": 2, "detected_after": 5}},
        {"h100-a": {"challenges": 1, "shadow": 3}, "l4-b": {"challenges": 4, "fail": 1}},
    ]
    assert validator_totals(stats) == {"answered": 2, "challenges": 7, "fail": 1, "pass": 2, "shadow": 3}


def test_cpu_of_a_process_tree_counts_new_processes_and_not_ended_ones():
    before = {1: 10.0, 2: 5.0, 3: 1.0}
    after = {1: 12.5, 2: 5.0, 4: 0.75}  # 3 ended, 4 started
    assert cpu_delta(before, after) == pytest.approx(3.25)


def test_engine_token_counters_are_read_from_ray_metrics_text():
    text = """# HELP ray_vllm_prompt_tokens_total Prompt tokens.
# TYPE ray_vllm_prompt_tokens_total counter
ray_vllm_prompt_tokens_total{ReplicaId="a"} 100.0
ray_vllm_prompt_tokens_total{ReplicaId="b"} 50.0
# HELP ray_vllm_generation_tokens_total Generation tokens.
# TYPE ray_vllm_generation_tokens_total counter
ray_vllm_generation_tokens_total{ReplicaId="a"} 7.0
# HELP ray_vllm_prompt_tokens_cached_total Cached prompt tokens.
# TYPE ray_vllm_prompt_tokens_cached_total counter
ray_vllm_prompt_tokens_cached_total{ReplicaId="a"} 1000.0
# HELP ray_vllm_request_prompt_tokens Per request.
# TYPE ray_vllm_request_prompt_tokens histogram
ray_vllm_request_prompt_tokens_bucket{le="+Inf"} 3.0
ray_vllm_request_prompt_tokens_sum 150.0
ray_vllm_request_prompt_tokens_count 3.0
"""
    assert sum_samples(text, ("ray_vllm_prompt_tokens", "ray_vllm_generation_tokens")) == 157.0
    assert sum_samples("", ("ray_vllm_prompt_tokens",)) == 0.0


class FakeEngine:
    max_model_len = 1024

    def prompt_logprobs_many(self, pairs, top_k):
        if not pairs:
            raise ValueError("empty")
        return [[{0: 0.0}] * len(c) for _, c in pairs]


class FakeService:
    def __init__(self) -> None:
        self.engine = FakeEngine()


def test_the_reference_meter_counts_every_call_and_stays_transparent():
    service = FakeService()
    assert _meter_reference(service) == dict.fromkeys(METER_KEYS, 0)
    metered = service.engine
    assert isinstance(metered, MeteredEngine) and metered.max_model_len == 1024
    out = metered.prompt_logprobs_many([((1, 2, 3), (4, 5)), ((6,), (7, 8, 9))], 20)
    assert out == [[{0: 0.0}] * 2, [{0: 0.0}] * 3]
    with pytest.raises(ValueError):  # a failed call still took engine time; its error reaches the caller
        metered.prompt_logprobs_many([], 20)
    m = _meter_reference(service)
    assert service.engine is metered  # metered once
    assert {k: m[k] for k in ("calls", "verifications", "prompt_tokens", "completion_tokens")} == {
        "calls": 2,
        "verifications": 2,
        "prompt_tokens": 4,
        "completion_tokens": 5,
    }
    assert m["busy_s"] >= 0.0


def test_every_figure_has_a_definition():
    out = summarise(observations())
    missing = [k for k in out if not any(d == k or d.startswith(k + ".") for d in DEFINITIONS)]
    assert not missing, missing

"""Real vLLM (CPU), node and reference DIFFERENT engines (issue 26): the node runs the default model in
bfloat16 on 1 OpenMP thread without prefix caching, the validator's reference in float32 on 2 threads
with it. Honest outputs (greedy at batch 1 and 8, seeded sampled) are never fraud and never convict
the node under the default thresholds; the seed-1 model's outputs are fraud; a wrong seed is caught.
Answers decoded under a JSON schema (the network's xgrammar settings) pass when the validator replays
the grammar's mask, and would fail as free text.

The node engine generates everything first and is stopped before the reference starts: one engine at a
time on a 2-core machine."""

from __future__ import annotations

import gc
import json
import os
import random

import pytest

pytestmark = pytest.mark.integration

NODE = {"dtype": "bfloat16", "threads": 1, "prefix_caching": False}
REFERENCE = {"dtype": "float32", "threads": 2, "prefix_caching": True}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "n": {"type": "integer"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from benchmarks.verification import challenge_prompts, challenge_requests, cpu_engine, vllm_claims
    from cluster.deployment import EngineDefaults
    from cluster.model import build_default_model
    from scoring.reference import HFCodec, VllmReferenceEngine

    d0 = build_default_model(0)
    codec = HFCodec.from_pretrained(d0)
    structured = {"structured_outputs_config": EngineDefaults().engine_kwargs["structured_outputs_config"]}
    node = cpu_engine(d0, **NODE, engine_kwargs=structured)
    greedy = [(p, m, 0.0, 0) for p, m in challenge_prompts(codec, 32, seed=7)]
    claims = vllm_claims(node, greedy[:16], batch_sizes=(1,)) + vllm_claims(node, greedy[16:], (8,))
    rng = random.Random(0)
    sampled_reqs = [(p, m, rng.choice((0.8, 1.0)), s) for p, m, _, s in challenge_requests(codec, 12, 3)]
    sampled = vllm_claims(node, sampled_reqs, batch_sizes=(4,))
    json_reqs = [(p, 48, 0.0, s) for p, _, _, s in greedy[:12]]
    json_claims = vllm_claims(node, json_reqs, batch_sizes=(4,), json_schema=json.dumps(SCHEMA))
    del node
    gc.collect()
    other = cpu_engine(build_default_model(1), **NODE, engine_kwargs=structured)  # the substituted model
    other_json = vllm_claims(other, json_reqs, batch_sizes=(4,), json_schema=json.dumps(SCHEMA))
    del other
    gc.collect()
    llm = cpu_engine(d0, **REFERENCE)
    yield {
        "ref": VllmReferenceEngine(llm=llm),
        "codec": codec,
        "greedy": claims,
        "sampled": sampled,
        "json": json_claims,
        "other_json": other_json,
    }
    del llm


def test_honest_bf16_node_is_never_convicted_and_other_model_is_fraud(setup):
    from benchmarks.verification import HFGenerator, _claim_from, challenge_prompts
    from cluster.model import build_default_model
    from scoring.score import NodeScorer
    from scoring.thresholds import VerifyThresholds
    from scoring.verify import verify

    ref, codec, th = setup["ref"], setup["codec"], VerifyThresholds()
    scorer = NodeScorer("v")
    verdicts = [verify(c, ref, codec, th) for c in setup["greedy"]]
    for v in verdicts:
        scorer.observe_verification("node", "default", v)
    flips = sum(t.rank > 1 for v in verdicts for t in v.tokens)
    print(
        f"\nbf16/1 thread node vs fp32/2 thread reference: {sum(v.n_tokens for v in verdicts)} tokens, "
        f"{flips} not the reference's argmax, largest margin {max(v.max_margin for v in verdicts):.3f} "
        f"nats, {sum(v.flagged for v in verdicts)} violations (tol {th.margin_tol})"
    )
    assert not [v.reasons for v in verdicts if v.verdict == "fraud"]
    assert not scorer.in_penalty("node") and scorer.scores()[0].integrity > 0.5
    assert sum(v.n_tokens for v in verdicts) > 200

    other = HFGenerator(build_default_model(1), codec.eos_token_ids)
    for p, m in challenge_prompts(codec, 4, seed=9):
        v = verify(_claim_from(other, codec, p, m), ref, codec, th)
        assert v.verdict == "fraud", v.reasons


def test_honest_bf16_seeded_samples_replay_within_tolerance_and_a_wrong_seed_is_caught(setup):
    """vLLM's CPU sampler replayed (scoring.replay) on fp32 reference logits for a bf16 node: honest
    samples are never fraud and never convict; the same output claimed under another seed is caught."""
    from scoring.replay import vllm_cpu_argmax
    from scoring.score import NodeScorer
    from scoring.verify import verify

    ref, codec = setup["ref"], setup["codec"]
    scorer = NodeScorer("v")
    tokens = wrong_caught = flagged = 0
    for c in setup["sampled"]:
        v = verify(c, ref, codec, sampler=vllm_cpu_argmax)
        assert v.replayed and v.verdict != "fraud", (c.temperature, v.reasons)
        scorer.observe_verification("node", "default", v)
        tokens += v.n_tokens
        flagged += v.flagged
        wrong = verify(c.model_copy(update={"seed": c.seed + 1}), ref, codec, sampler=vllm_cpu_argmax)
        wrong_caught += wrong.flagged > v.flagged or v.n_tokens < 4
    print(
        f"\nseeded samples, bf16 node vs fp32 reference: {tokens} tokens replayed, {flagged} outside the tolerance"
    )
    assert not scorer.in_penalty("node") and scorer.scores()[0].integrity > 0.5
    assert tokens > 300, tokens
    assert wrong_caught == len(setup["sampled"])


def test_honest_json_schema_answers_pass_under_the_replayed_grammar(setup):
    """Greedy answers a bf16 node decoded under a JSON schema: judged with the grammar's mask replayed
    (scoring.grammar) none is a violation; judged as free text, the forced JSON tokens lose the model's
    own argmax and the node would be blamed. The seed-1 model's answers under the same schema convict
    their node (the grammar forces the JSON's syntax, the values are the model's own)."""
    from scoring.score import NodeScorer
    from scoring.verify import verify

    ref, codec = setup["ref"], setup["codec"]
    verdicts = [verify(c, ref, codec) for c in setup["json"]]
    for c in setup["json"]:
        if c.finish_reason == "stop":
            assert set(json.loads(c.text)) == {"name", "n", "ok"}, c.text
    assert [v.verdict for v in verdicts] == ["pass"] * len(verdicts), [v.reasons for v in verdicts]
    tokens = sum(v.n_tokens for v in verdicts)
    free = [verify(c.model_copy(update={"json_schema": None}), ref, codec) for c in setup["json"]]
    print(
        f"\njson_schema answers: {tokens} tokens, {sum(v.flagged for v in verdicts)} violations under the "
        f"grammar, {sum(v.flagged for v in free)} as free text"
    )
    assert tokens > 100 and sum(v.flagged for v in free) > 0
    scorer = NodeScorer("v")
    caught = [verify(c, ref, codec) for c in setup["other_json"]]
    for v in caught:
        scorer.observe_verification("other", "default", v)
    print(f"seed-1 model under the schema: {[v.verdict for v in caught]}")
    assert scorer.in_penalty("other"), [v.reasons for v in caught]

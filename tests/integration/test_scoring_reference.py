"""Real vLLM (CPU), node and reference DIFFERENT engines (issue 26): the node runs the default model in
bfloat16 on 1 OpenMP thread without prefix caching, the validator's reference in float32 on 2 threads
with it. Honest outputs (greedy at batch 1 and 8, seeded sampled) are never fraud and never convict
the node under the default thresholds; the seed-1 model's outputs are fraud; a wrong seed is caught.

The node engine generates everything first and is stopped before the reference starts: one engine at a
time on a 2-core machine."""

from __future__ import annotations

import gc
import os
import random

import pytest

pytestmark = pytest.mark.integration

NODE = {"dtype": "bfloat16", "threads": 1, "prefix_caching": False}
REFERENCE = {"dtype": "float32", "threads": 2, "prefix_caching": True}


@pytest.fixture(scope="module")
def setup():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from benchmarks.verification import challenge_prompts, challenge_requests, cpu_engine, vllm_claims
    from cluster.model import build_default_model
    from scoring.reference import HFCodec, VllmReferenceEngine

    d0 = build_default_model(0)
    codec = HFCodec.from_pretrained(d0)
    node = cpu_engine(d0, **NODE)
    greedy = [(p, m, 0.0, 0) for p, m in challenge_prompts(codec, 32, seed=7)]
    claims = vllm_claims(node, greedy[:16], batch_sizes=(1,)) + vllm_claims(node, greedy[16:], (8,))
    rng = random.Random(0)
    sampled_reqs = [(p, m, rng.choice((0.8, 1.0)), s) for p, m, _, s in challenge_requests(codec, 12, 3)]
    sampled = vllm_claims(node, sampled_reqs, batch_sizes=(4,))
    del node
    gc.collect()
    llm = cpu_engine(d0, **REFERENCE)
    yield {"ref": VllmReferenceEngine(llm=llm), "codec": codec, "greedy": claims, "sampled": sampled}
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

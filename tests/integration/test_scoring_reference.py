"""Real vLLM (CPU): honest outputs of the default model pass verification at several batch sizes under the
seed-0 reference; the seed-1 model's outputs are fraud. One engine serves as node and reference."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from cluster.model import build_default_model
    from scoring.reference import HFCodec, VllmReferenceEngine

    d0 = build_default_model(0)
    llm = LLM(model=str(d0), max_model_len=1024, max_logprobs=20, seed=0)
    yield llm, VllmReferenceEngine(llm=llm), HFCodec.from_pretrained(d0)
    del llm


def test_honest_batched_outputs_pass_and_other_model_is_fraud(engine):
    from benchmarks.verification import HFGenerator, _claim_from, challenge_prompts, honest_completions
    from cluster.model import build_default_model
    from scoring.verify import VerifyThresholds, verify

    llm, ref, codec = engine
    th = VerifyThresholds()
    honest = honest_completions(llm, codec, 24, batch_sizes=(1, 8))
    verdicts = [verify(c, ref, codec, th) for c in honest]
    assert all(v.verdict == "pass" for v in verdicts), [v.reasons for v in verdicts if v.verdict != "pass"]
    assert sum(v.n_tokens for v in verdicts) > 200

    other = HFGenerator(build_default_model(1), codec.eos_token_ids)
    for p, m in challenge_prompts(codec, 4, seed=9):
        v = verify(_claim_from(other, codec, p, m), ref, codec, th)
        assert v.verdict == "fraud", v.reasons


def test_seeded_sampled_outputs_replay_exactly_and_a_wrong_seed_fails(engine):
    """vLLM's CPU sampler replayed (scoring.replay): honest seeded samples at T 0.8 / 1.0, batched with
    greedy requests, pass with no flagged token; the same output claimed under another seed fails."""
    import random

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.verification import challenge_prompts
    from scoring.replay import vllm_cpu_argmax
    from scoring.verify import Claim, verify

    llm, ref, codec = engine
    prompts = challenge_prompts(codec, 16, seed=3)
    rng = random.Random(0)
    params = [
        SamplingParams(max_tokens=m, temperature=rng.choice([0.0, 0.8, 1.0]), seed=rng.randrange(2**63))
        for _, m in prompts
    ]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in prompts], params, use_tqdm=False)
    sampled = wrong_caught = tokens = 0
    for (p, m), sp, o in zip(prompts, params, outs):
        c = Claim(
            prompt_token_ids=tuple(p),
            text=o.outputs[0].text,
            completion_token_ids=tuple(o.outputs[0].token_ids),
            reported_completion_tokens=len(o.outputs[0].token_ids),
            finish_reason=o.outputs[0].finish_reason,
            max_tokens=m,
            temperature=sp.temperature,
            seed=sp.seed,
        )
        v = verify(c, ref, codec, sampler=vllm_cpu_argmax)
        assert v.verdict == "pass" and v.flagged == 0, (sp.temperature, v.reasons)
        if sp.temperature > 0:
            sampled += 1
            tokens += v.n_tokens
            assert v.replayed
            wrong = verify(c.model_copy(update={"seed": sp.seed + 1}), ref, codec, sampler=vllm_cpu_argmax)
            wrong_caught += wrong.verdict != "pass" or v.n_tokens < 4
    assert sampled >= 6 and tokens > 300, (sampled, tokens)
    assert wrong_caught == sampled

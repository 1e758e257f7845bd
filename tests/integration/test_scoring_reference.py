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

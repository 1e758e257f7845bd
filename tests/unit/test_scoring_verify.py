"""Verification verdicts on a toy model: honest passes, substitution / inflation / truncation do not."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.fakes import EOS, BigramModel, FakeReferenceEngine, LetterCodec
from scoring.verify import Claim, TokenCheck, VerifyThresholds, calibrate, compare_tokens, verify

CODEC = LetterCodec()
REF = FakeReferenceEngine(BigramModel(seed=0))
PROMPT = (0, 5, 9, 3)


def _claim(model: BigramModel, max_tokens=16, temperature=0.0, seed=0, **over) -> Claim:
    ids, finish = model.generate(PROMPT, max_tokens, temperature, np.random.default_rng(seed))
    fields = {
        "prompt_token_ids": PROMPT,
        "text": CODEC.decode(ids),
        "completion_token_ids": tuple(ids),
        "reported_completion_tokens": len(ids),
        "finish_reason": finish,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    fields.update(over)
    return Claim(**fields)


def test_compare_tokens_rank_and_gap():
    # reference at pos 0: token 7 is top (p=.5), token 3 second (p=.3); emitted 3 -> rank 2, gap .2
    ref = [{7: np.log(0.5), 3: np.log(0.3)}, {4: np.log(0.9)}]
    c = compare_tokens([3, 8], ref, top_k=2)
    assert (c[0].rank, round(c[0].gap, 6)) == (2, 0.2)
    assert c[1].rank == 3 and c[1].logprob == -np.inf and c[1].gap == pytest.approx(0.9)  # outside top-k
    with pytest.raises(ValueError, match="positions"):
        compare_tokens([1, 2, 3], ref, top_k=2)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_honest_node_passes(temperature):
    for seed in range(20):
        v = verify(_claim(BigramModel(seed=0), temperature=temperature, seed=seed), REF, CODEC)
        assert v.verdict == "pass", v.reasons


def test_text_only_claim_is_retokenised():
    c = _claim(BigramModel(seed=0), completion_token_ids=None)
    v = verify(c, REF, CODEC)
    assert v.verdict == "pass", v.reasons


def test_substituted_model_is_fraud():
    v = verify(_claim(BigramModel(seed=1)), REF, CODEC)
    assert v.verdict == "fraud" and "another model" in " ".join(v.reasons)


def test_inflated_token_count_is_fraud():
    c = _claim(BigramModel(seed=0))
    v = verify(
        c.model_copy(update={"reported_completion_tokens": c.reported_completion_tokens + 5}), REF, CODEC
    )
    assert v.verdict == "fraud" and "inflated" in v.reasons[0]


def test_truncated_length_claim_is_fraud():
    c = _claim(BigramModel(seed=0), max_tokens=400)
    ids = c.completion_token_ids[:3]
    cut = c.model_copy(
        update={
            "completion_token_ids": ids,
            "text": CODEC.decode(ids),
            "reported_completion_tokens": 3,
            "finish_reason": "length",
        }
    )
    v = verify(cut, REF, CODEC)
    assert v.verdict == "fraud" and "truncated" in " ".join(v.reasons)


def test_truncated_stop_claim_is_fraud_when_the_model_would_continue():
    # A greedy run that ran to max_tokens: cutting it and claiming 'stop' puts an EOS where the
    # reference's argmax is something else.
    c = _claim(BigramModel(seed=0, eos_bias=-20.0), max_tokens=12)
    ids = c.completion_token_ids[:6]
    cut = c.model_copy(
        update={
            "completion_token_ids": ids,
            "text": CODEC.decode(ids),
            "reported_completion_tokens": 6,
            "finish_reason": "stop",
        }
    )
    v = verify(cut, FakeReferenceEngine(BigramModel(seed=0, eos_bias=-20.0)), CODEC)
    assert v.verdict == "fraud" and "would not stop" in " ".join(v.reasons)


def test_stop_with_eos_appended_by_verifier_passes():
    model = BigramModel(seed=0, eos_bias=8.0)  # stops quickly
    c = _claim(model, max_tokens=50)
    assert c.finish_reason == "stop" and c.completion_token_ids[-1] == EOS
    ids = c.completion_token_ids[:-1]  # an engine that leaves EOS out of the ids
    v = verify(
        c.model_copy(update={"completion_token_ids": ids, "reported_completion_tokens": len(ids)}),
        FakeReferenceEngine(model),
        CODEC,
    )
    assert v.verdict == "pass", v.reasons


def test_ids_that_do_not_match_text_fail():
    c = _claim(BigramModel(seed=0))
    v = verify(c.model_copy(update={"text": c.text + "zz"}), REF, CODEC)
    assert v.verdict == "fail" and "decode" in v.reasons[0]


def test_perturbed_weights_fail_at_calibrated_thresholds():
    honest_engine = FakeReferenceEngine(BigramModel(seed=0), jitter=1e-4, seed=3)
    node = BigramModel(seed=0, noise=0.8)
    verdicts = {
        verify(_claim(node, max_tokens=64, seed=s, finish_reason=None), honest_engine, CODEC).verdict
        for s in range(3)
    }
    assert verdicts & {"fail", "fraud"}


def test_calibration_covers_honest_near_ties_with_margin():
    # honest near-ties: rank 2 with gaps up to 0.004; one honest completion all exact
    honest = [
        [TokenCheck(0, 5, 2, -0.7, 0.004), TokenCheck(1, 6, 1, -0.1, 0.0)],
        [TokenCheck(0, 5, 1, -0.2, 0.0)],
    ]
    th = calibrate(honest, margin=3.0)
    assert th.greedy_gap_tol == pytest.approx(0.012)
    assert th.greedy_fail_rate == 0.0  # nothing honest is left mismatched -> any mismatch fails
    assert "2 greedy" in th.provenance
    sampled = [[TokenCheck(0, 5, 4, -6.0, 0.3)]]
    th2 = calibrate(honest, sampled, margin=2.0, base=VerifyThresholds(sampled_min_logprob=-5.0))
    assert th2.sampled_min_logprob == pytest.approx(-6.0 - 2 * np.log(2.0))
    with pytest.raises(ValueError):
        calibrate(honest, margin=0.5)


def test_near_tie_flip_passes_but_clear_mismatch_fails():
    ref = FakeReferenceEngine(BigramModel(seed=0))
    c = _claim(BigramModel(seed=0), max_tokens=10, finish_reason=None)
    # flip the last token to the reference's second choice (earlier prefixes stay the same)
    lp = ref.model.logprobs(c.completion_token_ids[-2])
    second = int(np.argsort(-lp)[1])
    gap = float(np.exp(lp).max() - np.exp(lp[second]))
    ids = (*c.completion_token_ids[:-1], second)
    flipped = c.model_copy(update={"completion_token_ids": ids, "text": CODEC.decode(ids)})
    assert verify(flipped, ref, CODEC, VerifyThresholds(greedy_gap_tol=gap + 1e-6)).verdict == "pass"
    v = verify(flipped, ref, CODEC, VerifyThresholds(greedy_gap_tol=gap / 2))
    assert v.verdict == "fail" and v.flagged == 1

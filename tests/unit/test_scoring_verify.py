"""Verification on a toy model: margins per token, evidence per completion; honest (also with float
noise) passes, substitution / inflation / truncation / wrong ids do not."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.fakes import EOS, BigramModel, FakeReferenceEngine, LetterCodec
from scoring.thresholds import VerifyThresholds, calibrate
from scoring.verify import Claim, Evidence, binomial_tail, compare_tokens, verify

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


def test_compare_tokens_rank_and_margin():
    # reference at pos 0: token 7 is top (p=.5), token 3 second (p=.3); emitted 3 -> rank 2,
    # margin ln(.5/.3) nats. Pos 1: 8 outside the top-k: the margin is a lower bound (top - k-th).
    ref = [{7: np.log(0.5), 3: np.log(0.3)}, {4: np.log(0.9), 5: np.log(0.05)}]
    c = compare_tokens([3, 8], ref, top_k=2)
    assert (c[0].rank, c[0].margin) == (2, pytest.approx(np.log(0.5 / 0.3)))
    assert c[1].rank == 3 and c[1].logprob == -np.inf and c[1].margin == pytest.approx(np.log(0.9 / 0.05))
    assert compare_tokens([7], ref[:1], top_k=2)[0].margin == 0.0  # the argmax itself
    with pytest.raises(ValueError, match="positions"):
        compare_tokens([1, 2, 3], ref, top_k=2)


@pytest.mark.parametrize(
    ("margin", "tol", "violation"),
    [
        (0.0, 0.75, False),  # the argmax
        (0.3, 0.75, False),  # a near-tie flipped by float noise
        (0.75, 0.75, False),  # at the tolerance: still honest
        (0.76, 0.75, True),
        (4.0, 0.75, True),  # another model's choice
        (0.3, 0.1, True),  # a tighter tolerance (same engine everywhere) flags it
    ],
)
def test_a_greedy_token_is_judged_by_its_margin(margin, tol, violation):
    # Two tokens: the reference's argmax 2 and the emitted 3, `margin` nats below it.
    class _Ref:
        def prompt_logprobs(self, prompt, completion, top_k):
            return [{2: -0.1, 3: -0.1 - margin}]

    c = Claim(
        prompt_token_ids=(0,),
        text="b",
        completion_token_ids=(3,),
        reported_completion_tokens=1,
        finish_reason="length",
        max_tokens=1,
    )
    v = verify(c, _Ref(), CODEC, VerifyThresholds(margin_tol=tol))
    assert (v.flagged, v.n_tokens, v.evidence.violations) == (int(violation), 1, int(violation))
    assert v.evidence.llr == pytest.approx(VerifyThresholds().llr(1, int(violation)))
    assert v.verdict == ("fail" if violation else "pass")  # one token is never fraud


@pytest.mark.parametrize(
    ("tokens", "violations", "sign"),
    [(0, 0, 0), (100, 0, -1), (100, 1, -1), (20, 1, 1), (100, 10, 1)],
)
def test_evidence_llr_signs(tokens, violations, sign):
    th = VerifyThresholds(honest_rate=0.005, cheat_rate=0.05)
    llr = th.llr(tokens, violations)
    assert np.sign(round(llr, 12)) == sign
    # exact Bernoulli log-likelihood ratio
    p0, p1 = 0.005, 0.05
    want = violations * np.log(p1 / p0) + (tokens - violations) * np.log((1 - p1) / (1 - p0))
    assert llr == pytest.approx(want)


def test_binomial_tail_matches_the_exact_sum():
    from math import comb

    for n, k, p in [(10, 0, 0.1), (10, 3, 0.1), (64, 5, 0.005), (16, 16, 0.5), (5, 6, 0.3)]:
        want = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_tail(n, k, p) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_rates_must_be_ordered_and_verdict_strings_map_to_evidence():
    with pytest.raises(ValueError, match="below cheat_rate"):
        VerifyThresholds(honest_rate=0.1, cheat_rate=0.05)
    assert Evidence.of_verdict("pass") == Evidence(0, 0, 0.0)
    assert Evidence.of_verdict("fraud").fraud and Evidence.of_verdict("fail").llr > 0
    with pytest.raises(ValueError, match="unknown verdict"):
        Evidence.of_verdict("maybe")


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


def test_ids_that_do_not_match_text_are_fraud():
    """Deterministic: a tokenizer decodes the same ids to the same text on any hardware."""
    c = _claim(BigramModel(seed=0))
    v = verify(c.model_copy(update={"text": c.text + "zz"}), REF, CODEC)
    assert v.verdict == "fraud" and "decode" in v.reasons[0] and v.evidence.fraud
    # A stop string cuts the text inside the ids' last tokens: a prefix of the decoded ids is honest.
    cut = c.model_copy(update={"text": c.text[:-2], "stop_strings": True, "finish_reason": "stop"})
    assert "decode" not in " ".join(verify(cut, REF, CODEC).reasons)


def test_perturbed_weights_fail_at_calibrated_thresholds():
    honest_engine = FakeReferenceEngine(BigramModel(seed=0), jitter=1e-4, seed=3)
    node = BigramModel(seed=0, noise=0.8)
    verdicts = {
        verify(_claim(node, max_tokens=64, seed=s, finish_reason=None), honest_engine, CODEC).verdict
        for s in range(3)
    }
    assert verdicts & {"fail", "fraud"}


def test_honest_float_noise_is_not_a_violation_but_another_model_is():
    """A node whose logits differ from the reference's by hardware-sized noise (0.1 nats) flips
    near-ties now and then; none of its tokens is a violation. The perturbed model (0.8) is caught."""
    ref = FakeReferenceEngine(BigramModel(seed=0))
    flips = violations = tokens = 0
    for noise_seed in range(30):
        node = BigramModel(seed=0, noise=0.1, noise_seed=noise_seed)
        for last in range(2, 24):  # every context the bigram model has
            ids, finish = node.generate((0, last), 16)
            c = Claim(
                prompt_token_ids=(0, last),
                text=CODEC.decode(ids),
                completion_token_ids=tuple(ids),
                reported_completion_tokens=len(ids),
                finish_reason=finish,
                max_tokens=16,
            )
            v = verify(c, ref, CODEC)
            assert v.verdict == "pass", v.reasons
            flips += sum(t.rank > 1 for t in v.tokens)
            violations += v.flagged
            tokens += v.n_tokens
    assert flips > 0 and violations == 0 and tokens > 1000  # the old zero-tolerance rule failed these
    bad = [verify(_claim(BigramModel(0, noise=0.8), max_tokens=64, seed=s), ref, CODEC) for s in range(5)]
    assert sum(v.flagged for v in bad) > 0 and any(v.verdict != "pass" for v in bad)


def test_a_different_model_is_fraud_only_when_noise_cannot_explain_it():
    th = VerifyThresholds()
    # Two tokens out of two: 2 violations at p0 0.005 has tail 2.5e-5, far above fraud_alpha: evidence only.
    short = _claim(BigramModel(seed=1), max_tokens=2, finish_reason=None)
    v = verify(short, REF, CODEC, th)
    assert v.verdict != "fraud" and v.evidence.violations <= 2 and not v.evidence.fraud
    long = verify(_claim(BigramModel(seed=1), max_tokens=64), REF, CODEC, th)
    assert long.verdict == "fraud" and long.evidence.fraud and "under honest noise" in long.reasons[0]


def test_calibration_covers_honest_margins_with_room():
    # honest margins: near-ties up to 0.2 nats in 4,000 tokens, no violation at 2 x that
    honest = [[0.0] * 98 + [0.2, 0.05] for _ in range(40)]
    th = calibrate(honest, margin=2.0, base=VerifyThresholds(honest_rate=1e-4, cheat_rate=0.05))
    assert th.margin_tol == pytest.approx(0.4)
    assert th.honest_rate == pytest.approx(3 / 4000)  # none seen: the rule of three
    assert th.cheat_rate == pytest.approx(0.05) and "40 honest completions" in th.provenance
    # honest violations beyond the tolerance raise p0 (x margin), and p1 stays 5 x above it
    noisy = [*honest, [5.0] * 3 + [0.0] * 97]
    th2 = calibrate(noisy, margin=2.0, base=VerifyThresholds(margin_tol=20.0))
    assert th2.margin_tol == pytest.approx(10.0)  # base tol / margin: a floor
    th3 = calibrate([[0.0] * 100], margin=2.0, base=VerifyThresholds(margin_tol=0.1, honest_rate=0.001))
    assert th3.margin_tol == pytest.approx(0.05) and th3.honest_rate == pytest.approx(0.03)
    assert th3.cheat_rate == pytest.approx(0.15)
    with pytest.raises(ValueError):
        calibrate(honest, margin=0.5)


def test_near_tie_flip_passes_but_clear_mismatch_is_a_violation():
    ref = FakeReferenceEngine(BigramModel(seed=0))
    c = _claim(BigramModel(seed=0), max_tokens=10, finish_reason=None)
    # flip the last token to the reference's second choice (earlier prefixes stay the same)
    lp = ref.model.logprobs(c.completion_token_ids[-2])
    second = int(np.argsort(-lp)[1])
    margin = float(lp.max() - lp[second])
    ids = (*c.completion_token_ids[:-1], second)
    flipped = c.model_copy(update={"completion_token_ids": ids, "text": CODEC.decode(ids)})
    assert verify(flipped, ref, CODEC, VerifyThresholds(margin_tol=margin + 1e-6)).flagged == 0
    v = verify(flipped, ref, CODEC, VerifyThresholds(margin_tol=margin / 2))
    assert v.flagged == 1 and v.verdict in ("pass", "fail") and not v.evidence.fraud


def test_the_sampled_floor_bounds_honest_violations_by_the_vocabulary():
    th = VerifyThresholds(honest_rate=0.004, sampled_min_logprob=-5.0)
    floor = th.floor_for(2048)
    assert floor == pytest.approx(np.log(0.004 / (4 * 2048))) and 2048 * np.exp(floor) <= 0.001 + 1e-12
    assert VerifyThresholds(sampled_min_logprob=-30.0).floor_for(10) == -30.0


def test_issue_26_honest_near_tie_flips_never_convict():
    """The incident: honest nodes of the right model emitted 1-2 tokens in 51-128 that were not the
    reference's argmax (float noise on other hardware) and were convicted, taking the whole network to
    quality 0. Measured honest margins of such flips here: 0.125-0.25 nats (benchmarks/RESULTS.md).
    Now 400 such completions are all passes, with no violation, and the node keeps integrity 1."""
    from scoring.score import NodeScorer

    class _NoisyRef:  # every position: the emitted token 2 is the runner-up, `margin` below token 3
        def __init__(self) -> None:
            self.margins: list[float] = []

        def prompt_logprobs(self, prompt, completion, top_k):
            return [{3: -0.6, 2: -0.6 - m, 4: -3.0} for m in self.margins]

    rng = np.random.default_rng(0)
    ref, scorer = _NoisyRef(), NodeScorer("v")
    for _ in range(400):
        n = int(rng.integers(51, 129))
        flips = set(rng.choice(n, size=int(rng.integers(1, 3)), replace=False).tolist())
        ref.margins = [0.25 if t in flips else 0.0 for t in range(n)]  # 0 = tie: 2 is an argmax too
        c = Claim(
            prompt_token_ids=(0,),
            text="a" * n,
            completion_token_ids=(2,) * n,
            reported_completion_tokens=n,
            finish_reason="length",
            max_tokens=n,
        )
        v = verify(c, ref, CODEC)
        assert v.verdict == "pass" and v.flagged == 0, v.reasons
        scorer.observe_verification("honest", "default", v)
    assert scorer.scores()[0].integrity == 1.0 and not scorer.in_penalty("honest")


def test_a_runner_up_inside_the_tolerance_is_a_flip_not_a_violation():
    """Greedy: the emitted token 3 is 0.3 nats below the reference's argmax 2 at every position. Each is
    inside the tolerance (no violation) and counted as a flip for the second sequential test; the argmax
    itself is neither."""

    class _Ref:
        def prompt_logprobs(self, prompt, completion, top_k):
            return [{2: -0.1, 3: -0.4} for _ in completion]

    def claim(ids):
        return Claim(
            prompt_token_ids=(0,),
            text="b" * len(ids) if ids[0] == 3 else "a" * len(ids),
            completion_token_ids=tuple(ids),
            reported_completion_tokens=len(ids),
            finish_reason="length",
            max_tokens=len(ids),
            temperature=0.0,
        )

    th = VerifyThresholds()
    flipped = verify(claim([3] * 8), _Ref(), CODEC, th).evidence
    assert (flipped.tokens, flipped.violations, flipped.flips) == (8, 0, 8)
    assert flipped.flip_llr == pytest.approx(th.flip_llr(8, 8)) and flipped.flip_llr > 0
    top = verify(claim([2] * 8), _Ref(), CODEC, th).evidence
    assert (top.violations, top.flips) == (0, 0) and top.flip_llr < 0

"""Seeded sampled completions verified by replaying the sampler (scoring.replay), with fakes."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.fakes import BigramModel, FakeReferenceEngine, LetterCodec
from scoring.replay import numpy_gumbel_argmax, replay_steps, resolve_sampler
from scoring.verify import Claim, verify

CODEC = LetterCodec()


def _claim(model: BigramModel, seed: int, temperature: float = 0.8, claimed_seed: int | None = None, **kw):
    prompt = CODEC.encode_prompt("the river town")
    ids, finish = model.generate(prompt, 48, temperature, seed=seed)
    return Claim(
        prompt_token_ids=tuple(prompt),
        text=CODEC.decode(ids),
        completion_token_ids=tuple(ids),
        reported_completion_tokens=len(ids),
        finish_reason=finish,
        max_tokens=48,
        temperature=temperature,
        seed=seed if claimed_seed is None else claimed_seed,
        **kw,
    )


@pytest.mark.parametrize("temperature", [0.3, 0.8, 1.0, 1.5])
def test_honest_seeded_samples_replay_exactly(temperature):
    engine = FakeReferenceEngine(BigramModel(0))
    for seed in range(20):
        v = verify(_claim(BigramModel(0), seed, temperature), engine, CODEC, sampler=numpy_gumbel_argmax)
        assert v.replayed and v.verdict == "pass" and v.flagged == 0, v.reasons


def test_substitution_and_ignored_seed_are_caught_where_the_floor_check_is_blind():
    engine = FakeReferenceEngine(BigramModel(0))
    other, floor_fraud, replay_fraud, ignored_seed = BigramModel(1, scale=1.0), 0, 0, 0
    for seed in range(20):
        c = _claim(other, seed)
        floor_fraud += verify(c, engine, CODEC).verdict != "pass"
        replay_fraud += verify(c, engine, CODEC, sampler=numpy_gumbel_argmax).verdict == "fraud"
        wrong = _claim(BigramModel(0), seed, claimed_seed=seed + 1)  # right model, not the request's seed
        ignored_seed += verify(wrong, engine, CODEC, sampler=numpy_gumbel_argmax).verdict != "pass"
    assert replay_fraud == 20
    assert ignored_seed >= 15  # same model, other noise: a short completion can coincide
    assert floor_fraud < 20  # the logprob floor lets some of the other model's samples through


def test_reshaped_or_unseeded_claims_fall_back_to_the_floor():
    engine = FakeReferenceEngine(BigramModel(0))
    c = _claim(BigramModel(0), 3)
    assert not verify(
        c.model_copy(update={"reshaped": True}), engine, CODEC, sampler=numpy_gumbel_argmax
    ).replayed
    assert not verify(
        c.model_copy(update={"seed": None}), engine, CODEC, sampler=numpy_gumbel_argmax
    ).replayed


def test_replay_steps_bounds_unknown_tokens():
    # Token 2 is known and the emitted one; with every other token unknown at the k-th value (-5), the
    # replay cannot rule them out when the noise is large: "unsure", never "bad".
    ref = [{2: -0.1, 3: -5.0}]
    steps = [replay_steps(ref, [2], 1.0, s, 24, numpy_gumbel_argmax) for s in range(50)]
    flat = [x for st in steps for x in st]
    assert set(flat) <= {"ok", "unsure", "bad"} and "ok" in flat
    # Emitting a known token the noise never favours over a much likelier known one is "bad".
    assert replay_steps([{2: 0.0, 3: -30.0}], [3], 1.0, 0, 24, numpy_gumbel_argmax) == ["bad"]
    with pytest.raises(ValueError):
        replay_steps(ref, [2], 0.0, 0, 24, numpy_gumbel_argmax)


def test_sampler_names():
    assert resolve_sampler("numpy") is numpy_gumbel_argmax and resolve_sampler("none") is None
    with pytest.raises(ValueError):
        resolve_sampler("gpu")
    rows = np.zeros((3, 24), dtype=np.float32)
    assert list(numpy_gumbel_argmax(rows, 7)) == list(numpy_gumbel_argmax(rows, 7))


async def test_shadow_items_with_a_seed_are_replayed():
    """Once the shadow record carries the request's seed (and top_p/top_k), organic sampled output is
    replayed like a challenge; a record without them keeps the floor check."""
    from cluster.records import ServedCompletion
    from scoring.validator import Validator, ValidatorConfig

    prompt = "the river town"
    ids, finish = BigramModel(1, scale=1.0).generate(CODEC.encode_prompt(prompt), 32, 0.8, seed=5)
    item = ServedCompletion(
        request_id="r",
        node_id="n",
        model="default",
        prompt=prompt,
        text=CODEC.decode(ids),
        token_ids=tuple(ids),
        completion_tokens=len(ids),
        finish_reason=finish,
        max_tokens=32,
        temperature=0.8,
    )

    v = Validator(
        ValidatorConfig(validator_id="v", node_sampler="numpy"),
        None,
        {"default": FakeReferenceEngine(BigramModel(0))},
        {"default": CODEC},
    )
    replayed = await v.verify_claim("default", v.claim_for_served(item.model_copy(update={"seed": 5})))
    assert replayed.replayed and replayed.verdict == "fraud"
    floor = await v.verify_claim("default", v.claim_for_served(item))
    assert not floor.replayed
    reshaped = await v.verify_claim(
        "default", v.claim_for_served(item.model_copy(update={"seed": 5, "top_p": 0.9}))
    )
    assert not reshaped.replayed


def test_replayed_samples_count_no_flips_so_honest_noise_never_builds_flip_evidence():
    """Sampler noise makes near-ties common: a bf16 node's honest samples differ from the exact fp32
    replay on 14% of tokens (tests/integration/test_scoring_reference.py), well above the greedy flip
    test's honest rate. Replayed tokens are judged only by the tolerance, never counted as flips."""
    from scoring.score import NodeScorer

    engine, scorer, tokens = FakeReferenceEngine(BigramModel(0)), NodeScorer("v"), 0
    node = BigramModel(0, noise=0.3)  # hardware-sized logit differences, larger than bf16's
    for seed in range(40):
        v = verify(_claim(node, seed, 1.0), engine, CODEC, sampler=numpy_gumbel_argmax)
        assert v.replayed and v.evidence.flips == 0 and v.evidence.flip_llr == 0.0
        scorer.observe_verification("node", "default", v)
        tokens += v.n_tokens
    assert tokens > 1000 and not scorer.in_penalty("node")

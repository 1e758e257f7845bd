"""Challenges written privately and shaped like the organic traffic a validator sees (issue 15)."""

from __future__ import annotations

import random

import pytest

from cluster.records import ServedCompletion
from scoring.challenge import SEED_BOUND, ChallengeConfig, ChallengePool
from scoring.organic import OrganicMix, PromptWriter, RequestShape, shape_of

TEXT = (
    "The river rose in spring. Boats came up from the coast with salt and cloth. "
    "Children watched from the bridge! Was the water cold? Nobody knew, and nobody asked."
)


def _served(i: int, temperature: float, max_tokens: int, roles=("system", "user")) -> ServedCompletion:
    return ServedCompletion(
        request_id=f"r{i}",
        node_id="n",
        model="default",
        messages=tuple({"role": r, "content": "a few words here " * (i % 5 + 1)} for r in roles),
        text="",
        completion_tokens=0,
        max_tokens=max_tokens,
        temperature=temperature,
    )


def test_challenges_copy_the_observed_organic_shapes():
    pool = ChallengePool(ChallengeConfig(), random.Random(0))
    for i in range(50):
        pool.observe_shape(shape_of(_served(i, 0.7, 77)))
    for _ in range(30):
        r = pool.sample("n", "default")
        assert r.body["temperature"] == 0.7 and r.body["max_tokens"] == 77
        assert [m["role"] for m in r.messages] == ["system", "user"]
        assert 0 <= r.body["seed"] < SEED_BOUND


def test_greedy_only_config_and_max_tokens_cap():
    pool = ChallengePool(ChallengeConfig(sampled=False, max_tokens_cap=50), random.Random(0))
    pool.observe_shape(shape_of(_served(0, 1.0, 400)))
    r = pool.sample("n", "default")
    assert r.body["temperature"] == 0.0 and r.body["max_tokens"] == 50


def test_validators_write_different_private_prompts():
    a = ChallengePool(ChallengeConfig(), random.Random(1))
    b = ChallengePool(ChallengeConfig(), random.Random(2))
    ta = {
        str(a.sample("n", "m").body.get("messages") or a.sample("n", "m").body.get("prompt"))
        for _ in range(50)
    }
    tb = {
        str(b.sample("n", "m").body.get("messages") or b.sample("n", "m").body.get("prompt"))
        for _ in range(50)
    }
    assert len(ta) > 40 and len(ta & tb) < 5


def test_writer_ends_at_a_sentence_end_near_the_target():
    w = PromptWriter([" ".join([TEXT] * 3)])
    rng = random.Random(0)
    for target in (3, 6, 12, 12, 12):  # one start, the sentence end nearest the target (sentences <= 9)
        text = w.write(rng, target)
        assert text[-1] in ".?!" and abs(len(text.split()) - target) <= 8, (target, text)
    with pytest.raises(ValueError):
        PromptWriter(["no capitals here"])


def test_writer_copies_how_a_message_ends_and_its_sentence_count():
    w = PromptWriter([TEXT * 3])
    rng = random.Random(0)
    for _ in range(20):
        cut = w.write(rng, 7, "")
        asked = w.write(rng, 9, "?")
        two = w.write(rng, 9, ".", sentences=2)
        assert cut[-1] not in ".?!" and len(cut.split()) <= 8, cut  # shorter only where the text ends
        assert asked.endswith("?"), asked
        assert sum(t[-1] in ".?!" for t in two.split()) == 2 and two[-1] in ".?!", two


def test_shapes_carry_endings_and_sentence_counts_but_no_words():
    item = ServedCompletion(
        request_id="r",
        node_id="n",
        model="default",
        messages=(
            {"role": "system", "content": "Be brief. Be kind."},
            {"role": "user", "content": "what is a river?"},
            {"role": "assistant", "content": "Water, moving"},
        ),
        text="",
        completion_tokens=0,
        max_tokens=16,
        temperature=1.0,
    )
    shape = shape_of(item)
    assert shape.ends == (".", "?", "") and shape.sentences == (2, 1, 0) and shape.words == (4, 4, 2)
    pool = ChallengePool(ChallengeConfig(), random.Random(0))
    pool.writer = PromptWriter([TEXT * 3])
    pool.observe_shape(shape)
    for _ in range(10):
        system, user, assistant = (m["content"] for m in pool.sample("n", "default").messages)
        assert user.endswith("?") and assistant[-1] not in ".?!" and system[-1] == "."


def test_mix_keeps_only_the_last_window():
    mix = OrganicMix(window=3)
    for t in (0.1, 0.2, 0.3, 0.4, 0.5):
        mix.observe(RequestShape("completion", ("prompt",), (5,), t, 16))
    rng = random.Random(0)
    assert {mix.draw(rng).temperature for _ in range(100)} == {0.3, 0.4, 0.5}


def test_classifier_catches_greedy_only_challenges_and_does_worse_on_organic_shapes():
    """The distinguishability measurement has teeth: the old tell (every challenge greedy) is found at
    once; with the organic mix the same classifiers do clearly worse (the benchmark reports the AUC)."""
    from benchmarks.verification import distinguishability

    greedy = distinguishability(300, seed=3, challenge_config=ChallengeConfig(sampled=False))
    organic = distinguishability(300, seed=3)
    assert greedy["auc"] > 0.9, greedy
    assert organic["auc"] < greedy["auc"] - 0.1, (organic, greedy)


def test_a_huge_organic_shape_gives_a_bounded_challenge():
    """Clients choose their shapes; one that fills the mix must not make challenges overflow the context."""
    pool = ChallengePool(ChallengeConfig(max_prompt_words=200), random.Random(0))
    pool.observe_shape(RequestShape("chat", ("user", "assistant") * 50, (5000, 5000) * 50, 0.0, 64))
    r = pool.sample("n", "default")
    assert len(r.messages) == 16
    assert sum(len(m["content"].split()) for m in r.messages) <= 200 + 16 * 20  # sentence ends round up

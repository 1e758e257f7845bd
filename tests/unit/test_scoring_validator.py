"""Validators end to end with fake I/O: challenges, verification, scores, consensus, shadow sampling."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from scoring.challenge import ChallengeConfig, ChallengePool, ShadowSampler
from scoring.challenge_client import parse_completion, parse_stream
from scoring.consensus import ConsensusState
from scoring.fakes import BigramModel, FakeReferenceEngine
from scoring.validator import Validator, ValidatorConfig
from tests.support.challenge_fakes import CODEC, challenge_node, fake_send


async def test_cheaters_lose_consensus_quality():
    models = {
        "honest-a": BigramModel(0),
        "honest-b": BigramModel(0),
        "swap": BigramModel(1),
        "inflate": BigramModel(0),
    }
    send = fake_send(models, inflate={"inflate"})
    engines = {"default": FakeReferenceEngine(BigramModel(0))}
    vals = [
        Validator(
            ValidatorConfig(validator_id=f"v{i}", node_sampler="numpy"),
            send,
            engines,
            {"default": CODEC},
            rng=random.Random(i),
        )
        for i in range(3)
    ]
    nodes = [challenge_node(n) for n in models]
    for _ in range(3):
        for v in vals:
            for n in nodes:
                await v.challenge_once(n)
    for v in vals:
        s = {x.node_id: x for x in v.scores()}
        assert s["swap"].integrity == 0.0 and s["inflate"].integrity == 0.0
        assert s["honest-a"].integrity == 1.0 and s["honest-a"].availability == 1.0
        assert v.tokens_spent > 0
    cs = ConsensusState({"v0": 50, "v1": 30, "v2": 20})
    q = cs.step({v.validator_id: v.scores() for v in vals})
    assert q.quality["swap"] == 0.0 and q.quality["inflate"] == 0.0
    assert min(q.quality["honest-a"], q.quality["honest-b"]) > 0.9
    # honest validators measured the same nodes alike: each keeps its full trust
    assert cs.validator_trust()["v0"] == pytest.approx(1.0, abs=0.01)
    assert cs.step({}, node_ids=["honest-a"]).epoch == 1


async def test_unreachable_node_loses_availability_not_integrity():
    honest = fake_send({"dead": BigramModel(0)})
    down = {"now": False}

    async def send(req):
        if down["now"]:
            raise ConnectionError("down")
        return await honest(req)

    v = Validator(
        ValidatorConfig(validator_id="v"),
        send,
        {"default": FakeReferenceEngine(BigramModel(0))},
        {"default": CODEC},
    )
    assert (await v.challenge_once(challenge_node("dead"))).verification.verdict == "pass"
    down["now"] = True
    for _ in range(3):
        out = await v.challenge_once(challenge_node("dead"))
        assert not out.response.ok and out.verification is None
    s = v.scores()[0]
    assert s.integrity == 1.0 and s.availability == pytest.approx(0.8**3) and 0 < s.score < 1


async def test_run_loop_challenges_each_live_node():
    models = {"a": BigramModel(0), "b": BigramModel(0)}
    cfg = ValidatorConfig(validator_id="v", challenge=ChallengeConfig(rate_per_node_per_min=6000))
    v = Validator(
        cfg, fake_send(models), {"default": FakeReferenceEngine(BigramModel(0))}, {"default": CODEC}
    )
    stop = asyncio.Event()

    async def nodes():
        return [challenge_node("a"), challenge_node("b")]

    task = asyncio.create_task(v.run(nodes, stop))
    for _ in range(200):
        await asyncio.sleep(0.02)
        if {s.node_id for s in v.scores()} == {"a", "b"}:
            break
    stop.set()
    await task
    assert {s.node_id for s in v.scores()} == {"a", "b"}


def test_challenges_look_like_organic_requests():
    pool = ChallengePool(ChallengeConfig(), random.Random(1))
    reqs = [pool.sample("n", "default") for _ in range(200)]
    assert {r.path for r in reqs} == {"/v1/chat/completions", "/v1/completions"}
    assert len({(r.prompt or r.messages[0]["content"]) for r in reqs}) > 100  # randomised
    chat = next(r for r in reqs if r.messages)
    assert chat.body["messages"][0]["role"] == "user" and chat.body["model"] == "default"
    delays = [pool.next_delay() for _ in range(4000)]
    assert np.mean(delays) == pytest.approx(120.0, rel=0.1)  # 0.5/min -> mean 120 s, exponential


def test_organic_prompts_only_when_enabled():
    off = ChallengePool(ChallengeConfig(), random.Random(0))
    off.observe_organic("PRIVATE")
    assert all("PRIVATE" not in (off.sample("n", "m").body.get("prompt") or "") for _ in range(50))
    on = ChallengePool(ChallengeConfig(use_organic_prompts=True, organic_share=1.0), random.Random(0))
    on.observe_organic("PRIVATE")
    for _ in range(20):  # replayed as the prompt, or as the last user turn of a chat
        body = on.sample("n", "m").body
        last = body.get("prompt") or [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        assert last == "PRIVATE"


def test_shadow_sampling_rate_and_determinism():
    s = ShadowSampler(0.1, "k")
    picks = [s.should_verify(f"req-{i}") for i in range(5000)]
    assert 0.08 < np.mean(picks) < 0.12
    assert picks == [s.should_verify(f"req-{i}") for i in range(5000)]
    # Another key draws another sample: the two overlap about as much as independent 10% samples (1%).
    other = [ShadowSampler(0.1, "other").should_verify(f"req-{i}") for i in range(5000)]
    both = sum(a and b for a, b in zip(picks, other))
    assert 0.08 < np.mean(other) < 0.12 and both < 0.03 * len(picks), (sum(picks), sum(other), both)
    with pytest.raises(ValueError):
        ShadowSampler(1.5, "k")


def test_parse_openai_responses():
    r = parse_completion(
        {
            "choices": [{"text": "hi", "finish_reason": "stop", "token_ids": [5, 6]}],
            "usage": {"completion_tokens": 2},
        },
        200,
        0.1,
        0.2,
    )
    assert (r.ok, r.text, r.token_ids, r.completion_tokens, r.finish_reason) == (
        True,
        "hi",
        (5, 6),
        2,
        "stop",
    )
    chunks = [
        {"choices": [{"delta": {"content": "a"}, "token_ids": [1]}]},
        {"choices": [{"delta": {"content": "b"}, "token_ids": [2], "finish_reason": "length"}]},
        {"choices": [], "usage": {"completion_tokens": 2}},
    ]
    s = parse_stream(chunks, 0.1, 0.3)
    assert (s.text, s.token_ids, s.finish_reason, s.completion_tokens) == ("ab", (1, 2), "length", 2)
    assert not parse_stream(chunks[:1], 0.1, 0.2).ok  # cut stream
    assert not parse_completion({"error": {"message": "x"}}, 500, None, 0.1).ok

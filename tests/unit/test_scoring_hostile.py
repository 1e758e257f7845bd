"""Validators treat node output as hostile (issue 10): whatever a node returns ends in a verdict or in
"unavailable", never in an exception that stops a validator loop; stale scores expire in consensus."""

from __future__ import annotations

import asyncio

import pytest

from cluster.completions import MAX_IDS
from cluster.records import NodeScore
from scoring.challenge_client import ChallengeResponse, parse_completion, parse_stream
from scoring.consensus import ConsensusState
from scoring.fakes import BigramModel, FakeReferenceEngine, LetterCodec
from scoring.validator import Validator, ValidatorConfig, supervise
from tests.support.challenge_fakes import challenge_node, fake_send

CODEC = LetterCodec()


class _CountingReference(FakeReferenceEngine):
    def __init__(self) -> None:
        super().__init__(BigramModel(0))
        self.calls = 0

    def prompt_logprobs(self, prompt_token_ids, completion_token_ids, top_k):
        self.calls += 1
        return super().prompt_logprobs(prompt_token_ids, completion_token_ids, top_k)


def _validator(send, engine=None) -> Validator:
    return Validator(
        ValidatorConfig(validator_id="v"),
        send,
        {"default": engine or _CountingReference()},
        {"default": CODEC},
    )


def _lying(**fields):
    async def send(req):
        base = {
            "ok": True,
            "status": 200,
            "text": "ab",
            "token_ids": (2, 3),
            "completion_tokens": 2,
            "finish_reason": "length",
            "ttft_s": 0.01,
            "elapsed_s": 0.1,
        }
        return ChallengeResponse(**{**base, "completion_tokens": req.max_tokens, **fields})

    return send


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"token_ids": (2, 3, 10_000)}, "outside the model's vocabulary"),
        ({"token_ids": (2,) * 5000}, "token ids for max_tokens"),
        ({"malformed": "malformed completion (3 invalid fields)"}, "malformed"),
    ],
)
async def test_unverifiable_output_is_fraud_without_touching_the_engine(fields, reason):
    engine = _CountingReference()
    v = _validator(_lying(**fields), engine)
    out = await v.challenge_once(challenge_node("liar"))
    assert out.verification.verdict == "fraud" and reason in out.verification.reasons[0]
    assert engine.calls == 0 and v.scorer.in_penalty("liar")


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"text": 5, "finish_reason": "stop"}]},  # text is not a string
        {"choices": [{"text": "ab", "token_ids": [2, -1], "finish_reason": "stop"}]},  # negative id
        {"choices": [{"text": "ab", "token_ids": ["2"], "finish_reason": "stop"}]},  # ids as strings
        {"choices": [{"text": "ab", "token_ids": [True], "finish_reason": "stop"}]},  # bools are not ids
        {"choices": [{"text": "ab", "finish_reason": "stop"}], "usage": {"completion_tokens": -3}},
        {"choices": [{"text": "ab", "finish_reason": "stop"}], "usage": {"completion_tokens": 2**70}},
        {"choices": "nope"},
        [1, 2, 3],
        "garbage",
    ],
)
def test_parsers_turn_malformed_node_json_into_a_malformed_answer(body):
    r = parse_completion(body, status=200, ttft_s=0.1, elapsed_s=0.2)
    assert r.ok and r.malformed.startswith("malformed completion"), r
    s = parse_stream([{"choices": [{"text": "a"}]}, body], ttft_s=0.1, elapsed_s=0.2)
    assert s.ok and s.malformed, s


def test_a_stream_with_too_many_ids_is_malformed():
    chunk = {"choices": [{"text": "", "token_ids": [2] * 1024}]}
    r = parse_stream([chunk] * (MAX_IDS // 1024 + 1), ttft_s=0.1, elapsed_s=0.2)
    assert r.ok and f"over {MAX_IDS} token ids" in r.malformed, r.malformed


def test_well_formed_answers_still_parse():
    r = parse_completion(
        {
            "choices": [{"message": {"content": "ab"}, "token_ids": [2, 3], "finish_reason": "stop"}],
            "usage": {"completion_tokens": 2},
        },
        status=200,
        ttft_s=0.1,
        elapsed_s=0.2,
    )
    assert r.ok and not r.malformed and r.text == "ab" and r.token_ids == (2, 3) and r.completion_tokens == 2


async def test_a_failing_reference_is_no_verdict_and_the_loop_goes_on():
    class Broken(FakeReferenceEngine):
        def prompt_logprobs(self, *a, **k):
            raise RuntimeError("engine died")

    v = _validator(fake_send({"n": BigramModel(0)}), Broken(BigramModel(0)))
    out = await v.challenge_once(challenge_node("n"))
    assert out.verification is None and v.stats()["n"]["verify_error"] == 1
    assert v.scores() == []  # the node did nothing wrong: no verdict, no score


async def test_a_dying_loop_is_restarted_and_counted():
    from scoring import metrics

    stop, runs = asyncio.Event(), []

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        stop.set()

    before = metrics.LOOP_RESTARTS.labels("vt", "challenge")._value.get()
    await asyncio.wait_for(supervise("vt", "challenge", flaky, stop, backoff_s=0.01), 5)
    assert len(runs) == 3 and metrics.LOOP_RESTARTS.labels("vt", "challenge")._value.get() == before + 2


def _score(v: str, node: str, at: float) -> NodeScore:
    return NodeScore(validator=v, node_id=node, integrity=1.0, availability=1.0, speed=1.0, score=1.0, at=at)


def test_consensus_ignores_scores_past_the_activity_cutoff():
    """v1 (half the stake) stopped observing node b an hour ago: its old score no longer counts, so b is
    judged only by v2 (a quarter of the stake) and becomes unscored rather than kept alive by v1."""
    stakes = {"v1": 2.0, "v2": 1.0, "v3": 1.0}
    state = ConsensusState(stakes, activity_cutoff_s=900.0)
    scores = {
        "v1": [_score("v1", "a", 9_000), _score("v1", "b", 5_000)],
        "v2": [_score("v2", "a", 9_000), _score("v2", "b", 9_000)],
        "v3": [],
    }
    q = state.step(scores, now=9_100)
    assert q.quality == {"a": 1.0}
    assert ConsensusState(stakes).step(scores, now=9_100).quality.keys() == {
        "a",
        "b",
    }
    with pytest.raises(ValueError, match="activity_cutoff_s"):
        ConsensusState(stakes, activity_cutoff_s=0)

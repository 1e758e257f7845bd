"""Validators and consensus without Ray: the per-epoch quality mapping, one consensus round, validator
stats, the shared reference engine, the shadow feed, and the config section."""

from __future__ import annotations

import random

import pytest

from cluster.records import NodeScore, NodeStats
from deploy.config import NetworkConfig
from deploy.scoring import ValidatorSpec
from scoring.challenge_client import ChallengeResponse
from scoring.consensus_service import ConsensusService
from scoring.epoch_quality import EpochQuality
from scoring.fakes import BigramModel, FakeReferenceEngine, LetterCodec
from scoring.validator import Validator, ValidatorConfig
from tests.support.validator_fakes import node_scores

CODEC = LetterCodec()


def _score(validator: str, node: str, score: float) -> NodeScore:
    (one,) = node_scores(validator, {node: score}, 0.0)
    return one


def _service(stakes: dict[str, float], **kwargs) -> ConsensusService:
    """A consensus actor (no Ray) over validators with these configured stakes (addresses unused here)."""
    kwargs = {"period_s": 1.0, "epoch_length_s": 30.0, "genesis": 0.0} | kwargs
    return ConsensusService(stakes, dict.fromkeys(stakes, "0x" + "00" * 20), **kwargs)


def test_epoch_quality_is_the_mean_of_the_rounds_in_each_epoch():
    eq = EpochQuality(epoch_length_s=10.0, genesis=100.0)
    assert eq.add(101.0, {"a": 1.0, "c": 0.5}) == (0, {"a": 1.0, "c": 0.5})
    assert eq.add(109.9, {"a": 0.5, "c": 0.0}) == (0, {"a": 0.75, "c": 0.25})
    # A new epoch starts from scratch: a node caught before it starts has mean 0 for all of it.
    assert eq.add(110.0, {"a": 1.0, "c": 0.0}) == (1, {"a": 1.0, "c": 0.0})
    eq.add(115.0, {"a": 0.5, "c": 0.0, "new": 1.0})
    assert eq.mean(1) == {"a": 0.75, "c": 0.0, "new": 1.0}  # a late node is averaged over its own rounds
    assert eq.mean(0) == {"a": 0.75, "c": 0.25}
    assert eq.mean(7) is None
    assert eq.epoch_of(50.0) == 0  # before genesis counts as epoch 0, like the ledger's first epoch


def test_epoch_quality_rejects_a_bad_length():
    with pytest.raises(ValueError, match="epoch_length_s"):
        EpochQuality(0.0, 0.0)


def test_consensus_round_zeroes_the_node_the_stake_majority_zeroes():
    svc = _service({"v1": 2.0, "v2": 1.0, "v3": 0.5})
    assert svc.round({"v1": [], "v2": [], "v3": []}, now=1.0) is None
    scores = {
        "v1": [_score("v1", "a", 0.9), _score("v1", "b", 0.8), _score("v1", "cheat", 0.0)],
        "v2": [_score("v2", "a", 0.9), _score("v2", "b", 0.9), _score("v2", "cheat", 0.0)],
        # a minority validator vouching for the cheater cannot lift it above what the majority set
        "v3": [_score("v3", "a", 0.1), _score("v3", "b", 0.1), _score("v3", "cheat", 1.0)],
    }
    quality, epoch, mean = svc.round(scores, now=31.0)
    assert epoch == 1 and svc.rounds == 1
    assert quality.quality["cheat"] == 0.0 and mean["cheat"] == 0.0
    assert max(quality.quality.values()) == 1.0 and quality.quality["b"] > 0.5


def test_consensus_round_exports_gauges():
    from prometheus_client import generate_latest

    from scoring.metrics import REGISTRY

    svc = _service({"vx": 1.0})
    svc.round({"vx": [_score("vx", "gauge-a", 1.0), _score("vx", "gauge-b", 0.0)]}, now=0.0)
    text = generate_latest(REGISTRY).decode()
    assert 'meritnet_node_consensus_quality{node="gauge-b"} 0.0' in text
    assert 'meritnet_node_integrity{node="gauge-a",validator="vx"} 1.0' in text
    assert 'meritnet_validator_trust{validator="vx"}' in text


def _node(nid: str) -> NodeStats:
    return NodeStats(
        node_id=nid,
        model_id="default",
        operator="0x" + "11" * 20,
        accelerator_type="cpu",
        capacity=4,
        live=True,
        running_replicas=1,
        joined_at=0.0,
    )


async def test_validator_stats_count_verdicts_and_challenges_to_detect():
    models = {"honest": BigramModel(0), "swap": BigramModel(1)}

    async def send(req):
        prompt = CODEC.encode_chat(list(req.messages)) if req.messages else CODEC.encode_prompt(req.prompt)
        ids, finish = models[req.node_id].generate(prompt, req.max_tokens, req.temperature)
        return ChallengeResponse(
            ok=True,
            status=200,
            text=CODEC.decode(ids),
            token_ids=tuple(ids),
            completion_tokens=len(ids),
            finish_reason=finish,
            ttft_s=0.01,
            elapsed_s=0.1,
        )

    v = Validator(
        ValidatorConfig(validator_id="v"),
        send,
        {"default": FakeReferenceEngine(BigramModel(0))},
        {"default": CODEC},
        rng=random.Random(0),
    )
    for _ in range(3):
        for n in ("honest", "swap"):
            await v.challenge_once(_node(n))
    stats = v.stats()
    assert stats["honest"] == {"challenges": 3, "answered": 3, "pass": 3}
    assert stats["swap"]["challenges"] == 3 and stats["swap"].get("pass", 0) == 0
    assert stats["swap"]["detected_after"] == 1


def test_validators_config_section():
    assert NetworkConfig().validators == []  # off by default: one more vLLM engine on a 2-core demo
    cfg = NetworkConfig(validators=[{"validator_id": "v1", "stake": 2}], scoring_metrics_port=9464)
    assert cfg.validators == [ValidatorSpec(validator_id="v1", stake=2.0)] and cfg.shared_reference_engine
    with pytest.raises(ValueError, match="stake"):
        NetworkConfig(validators=[{"validator_id": "v1", "stake": -1}])
    with pytest.raises(ValueError, match="validator_id"):
        NetworkConfig(validators=[{"stake": 1}])
    assert not cfg.validators[0].use_organic_prompts and cfg.shadow_rate == 0.02  # private by default
    with pytest.raises(ValueError, match="shadow_rate"):
        NetworkConfig(shadow_rate=1.5)


class _CountingEngine:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def prompt_logprobs_many(self, pairs, top_k):
        self.calls.append(len(pairs))
        if any(c[0] < 0 for _p, c in pairs):  # as vLLM does for an id it cannot embed
            raise ValueError("token id out of range")
        return [[{int(c[0]): -0.1 * top_k}] for _p, c in pairs]


async def test_shared_reference_engine_batches_concurrent_calls_and_returns_each_its_own():
    import asyncio

    from scoring.shared_engine import ReferenceEngineService

    svc = ReferenceEngineService(None, engine=_CountingEngine())
    outs = await asyncio.gather(
        *(svc.prompt_logprobs_many([([1], [i]), ([2], [i + 100])], 20) for i in range(5))
    )
    assert [[next(iter(d)) for (d,) in o] for o in outs] == [[i, i + 100] for i in range(5)]
    assert sum(svc.engine.calls) == 10 and len(svc.engine.calls) < 5  # batched, nothing lost
    assert await svc.stats() == {"calls": 5, "batches": len(svc.engine.calls), "isolated": 0}


async def test_shared_reference_engine_isolates_a_bad_item_from_its_batch():
    """One caller's bad item (an id the engine rejects) fails that caller alone; batch-mates get results."""
    import asyncio

    from scoring.shared_engine import ReferenceEngineService

    svc = ReferenceEngineService(None, engine=_CountingEngine())
    outs = await asyncio.gather(
        *(svc.prompt_logprobs_many([([1], [i])], 20) for i in (3, -1, 4)), return_exceptions=True
    )
    assert isinstance(outs[1], ValueError)
    assert [next(iter(o[0][0])) for o in (outs[0], outs[2])] == [3, 4]
    assert (await svc.stats())["isolated"] >= 1


def test_shadow_feed_gives_each_reader_every_item_and_drops_the_oldest_when_full():
    from scoring.shadow_feed import ShadowFeed

    feed = ShadowFeed(capacity=3)
    feed.offer(["a", "b"])
    assert feed.since(0) == (["a", "b"], 2)
    assert feed.since(0, limit=1) == (["a"], 1) and feed.since(1) == (["b"], 2)
    assert feed.since(2) == ([], 2)  # nothing new
    feed.offer(["c", "d", "e"])  # capacity 3: a and b are dropped
    assert feed.since(2) == (["c", "d", "e"], 5)
    assert feed.since(0) == (["c", "d", "e"], 5)  # a reader that fell behind skips what was dropped
    assert feed.stats() == {"offered": 5, "held": 3, "dropped": 2}
    with pytest.raises(ValueError):
        ShadowFeed(capacity=0)


def _served(node: str, model: BigramModel, i: int, *, chat: bool, inflate: int = 0):
    from cluster.records import ServedCompletion

    rng = random.Random(i)
    text = f"organic request {i} " + "".join(rng.choice("abcdef") for _ in range(5))
    messages = ({"role": "user", "content": text},) if chat else None
    prompt_ids = CODEC.encode_chat([dict(m) for m in messages]) if chat else CODEC.encode_prompt(text)
    ids, finish = model.generate(prompt_ids, 12, 0.0)
    return ServedCompletion(
        request_id=f"req-{node}-{i}",
        node_id=node,
        model="default",
        prompt=None if chat else text,
        messages=messages,
        text=CODEC.decode(ids),
        token_ids=tuple(ids),
        completion_tokens=len(ids) + inflate,
        finish_reason=finish,
        max_tokens=12,
        temperature=0.0,
    )


async def test_shadow_verification_of_organic_completions_reaches_the_scores():
    """A node that is honest on challenges but serves organic traffic from other weights is caught by
    shadow verification alone; honest organic completions pass."""
    import asyncio

    v = Validator(
        ValidatorConfig(validator_id="v"),
        None,
        {"default": FakeReferenceEngine(BigramModel(0))},
        {"default": CODEC},
    )
    items = [_served("honest", BigramModel(0), i, chat=bool(i % 2)) for i in range(6)]
    items += [_served("sly", BigramModel(1), i, chat=bool(i % 2)) for i in range(3)]
    items.append(
        _served("other-model", BigramModel(0), 0, chat=False).model_copy(update={"model": "unknown"})
    )
    pages = [items[:4], items[4:]]

    async def fetch(cursor):
        return (pages[cursor], cursor + 1) if cursor < len(pages) else ([], cursor)

    stop = asyncio.Event()
    task = asyncio.create_task(v.follow_shadow_feed(fetch, stop, poll_s=0.01))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if sum(c.get("shadow", 0) for c in v.stats().values()) == 9:
            break
    stop.set()
    await task
    stats = v.stats()
    assert stats["honest"] == {"pass": 6, "shadow": 6, "shadow_pass": 6}
    assert (
        stats["sly"]["shadow"] == 3
        and stats["sly"].get("pass", 0) == 0
        and stats["sly"]["detected_after"] == 1
    )
    assert "other-model" not in stats  # no reference engine for its model: skipped, not failed
    scores = {s.node_id: s for s in v.scores()}
    assert scores["sly"].integrity == 0.0 and scores["honest"].integrity == 1.0


async def test_shadow_verification_catches_inflated_organic_counts_and_respects_the_validator_sample():
    from scoring.challenge import ChallengeConfig

    engines = {"default": FakeReferenceEngine(BigramModel(0))}
    v = Validator(ValidatorConfig(validator_id="v"), None, engines, {"default": CODEC})
    verdict = await v.shadow_verify(_served("n", BigramModel(0), 1, chat=False, inflate=5))
    assert verdict is not None and verdict.verdict == "fraud"
    never = Validator(
        ValidatorConfig(validator_id="w", challenge=ChallengeConfig(shadow_rate=0.0)),
        None,
        engines,
        {"default": CODEC},
    )
    assert await never.shadow_verify(_served("n", BigramModel(0), 1, chat=False)) is None


async def test_shadow_items_seed_challenges_only_when_organic_prompts_are_allowed():
    from scoring.challenge import ChallengeConfig

    engines = {"default": FakeReferenceEngine(BigramModel(0))}
    item = _served("n", BigramModel(0), 3, chat=True)
    private = Validator(ValidatorConfig(validator_id="p"), None, engines, {"default": CODEC})
    await private.shadow_verify(item)
    assert all(
        item.messages[0]["content"] not in str(private.pool.sample("n", "default").body) for _ in range(20)
    )
    cfg = ChallengeConfig(use_organic_prompts=True, organic_share=1.0)
    open_ = Validator(ValidatorConfig(validator_id="o", challenge=cfg), None, engines, {"default": CODEC})
    await open_.shadow_verify(item)
    assert item.messages[0]["content"] in str(open_.pool.sample("n", "default").body)


def _epoch_rewards(queued_until: float, late_verifier: str | None, verified_at: float):
    """The cheater-test sequence of issue 9, on a fake clock with the real scorers, consensus and reward
    rule (no Ray). Three validators (stakes 3/1/1: v1 alone is a kappa-majority) score three nodes: l4-b honest and verified, h100-c
    caught substituting weights, h100-a honest and answering every challenge, but its verifications are
    queued behind the shared reference engine until `queued_until` (under load on 2 cores), except that
    `late_verifier` gets its first pass at `verified_at`. Consensus runs every 2 s through epoch 17
    (t = 510..540); all three nodes served traffic in it. Returns the epoch's quality and rewards."""
    from scoring.score import NodeScorer
    from settlement.rewards import NodeUsage, compute_rewards, epoch_quality

    stakes = {"v1": 3.0, "v2": 1.0, "v3": 1.0}
    scorers = {v: NodeScorer(v) for v in stakes}
    for t in (500.0, 505.0):
        for sc in scorers.values():
            for node in ("l4-b", "h100-c", "h100-a"):
                sc.observe_challenge(node, "default", True, 0.05, 40.0, now=t)
            sc.observe_verification("l4-b", "default", "pass", now=t)
            sc.observe_verification("h100-c", "default", "fraud", now=t)
    svc = _service(stakes, period_s=2.0)
    for t in range(510, 540, 2):
        for v, sc in scorers.items():
            sc.observe_challenge("h100-a", "default", True, 0.05, 40.0, now=t)
            if t >= queued_until or (v == late_verifier and t >= verified_at):
                sc.observe_verification("h100-a", "default", "pass", now=t)
        result = svc.round({v: sc.scores() for v, sc in scorers.items()}, now=float(t))
        assert result is not None and result[1] == 17
    usage = {n: NodeUsage("op-" + n, 300, 200) for n in ("h100-a", "h100-c", "l4-b")}
    quality = epoch_quality(usage, svc.epochs.mean(17), default=1.0)
    return quality, compute_rewards(usage, quality, 10**21, 1, 1).per_node


@pytest.mark.parametrize(
    ("queued_until", "late_verifier", "verified_at"),
    [
        (1e9, None, 0.0),  # no verdict on h100-a during the whole epoch (verification queued)
        (1e9, "v2", 516.0),  # only a minority validator (stake 1/5) got its verdict in the epoch
        (1e9, "v1", 530.0),  # the kappa-majority validator's first pass came late in the epoch
        (520.0, None, 0.0),  # everyone's first pass arrived a third into the epoch
    ],
)
def test_an_honest_node_whose_verification_lags_still_earns_its_share(
    queued_until, late_verifier, verified_at
):
    """Issue 9: before the fix a node with no verdict yet scored 0 at every validator, Yuma gave it
    consensus 0, and settlement paid the honest h100-a nothing for epoch 17 (the whole emission went to
    l4-b). No verdict is no opinion: such a node is unscored, never 'caught'."""
    quality, rewards = _epoch_rewards(queued_until, late_verifier, verified_at)
    assert rewards["h100-c"] == 0 and quality["h100-c"] == 0.0  # the cheater still earns nothing
    assert rewards["h100-a"] > 0 and rewards["l4-b"] > 0, (quality, rewards)
    # Verified rounds count, unverified ones do not. (A lone validator's verdict is worth less: its row
    # of weights is normalised over the nodes it has judged, so l4-b still outweighs h100-a there.)
    assert quality["h100-a"] >= (0.5 if late_verifier == "v1" else 0.9), quality


def test_a_kappa_majority_still_zeroes_a_node_it_has_caught():
    """The coverage rule only hides nodes nobody with more than kappa of the stake has judged: a node
    the v1 validator (3/5 of the stake) caught is scored 0 even while the others have no verdict yet."""
    from scoring import ConsensusState
    from scoring.score import NodeScorer

    scorers = {v: NodeScorer(v) for v in ("v1", "v2", "v3")}
    for sc in scorers.values():
        sc.observe_challenge("honest", "default", True, 0.05, 40.0)
        sc.observe_verification("honest", "default", "pass")
    scorers["v1"].observe_verification("cheat", "default", "fraud")
    q = ConsensusState({"v1": 3.0, "v2": 1.0, "v3": 1.0}).step({v: sc.scores() for v, sc in scorers.items()})
    assert q.quality == {"honest": 1.0, "cheat": 0.0}
    scorers = {v: NodeScorer(v) for v in ("v1", "v2", "v3")}
    for sc in scorers.values():
        sc.observe_challenge("honest", "default", True, 0.05, 40.0)
        sc.observe_verification("honest", "default", "pass")
    scorers["v2"].observe_verification("new", "default", "pass")  # a fifth of the stake: not yet scored
    q = ConsensusState({"v1": 3.0, "v2": 1.0, "v3": 1.0}).step({v: sc.scores() for v, sc in scorers.items()})
    assert q.quality == {"honest": 1.0}


def test_consensus_rounds_average_each_validators_dividends_by_its_signing_address():
    """Validators are paid at the address their reports are signed with: the consensus actor keeps
    each epoch's mean dividend per address (every round counts) for settlement."""
    addresses = {v: f"0x{i + 1:040x}" for i, v in enumerate(("A", "B", "C"))}
    svc = ConsensusService(
        dict.fromkeys(addresses, 1.0), addresses, period_s=1.0, epoch_length_s=30.0, genesis=0.0
    )
    both = {"x": 1.0, "y": 1.0}

    def scores(v, weights, t):
        return [_score(v, n, w).model_copy(update={"at": t}) for n, w in weights.items()]

    svc.round({v: scores(v, both if v != "B" else {"y": 1.0}, 1.0) for v in addresses}, now=1.0)
    svc.round({v: scores(v, both, 2.0) for v in addresses}, now=2.0)
    # The hand-worked rounds of tests/unit/test_consensus_dividends.py: (2/5, 1/5, 2/5) then
    # (50/120, 20/120, 50/120); the epoch's mean is their average.
    mean = svc.epochs.mean_dividends(0)
    assert mean == pytest.approx(
        {
            addresses["A"]: (2 / 5 + 50 / 120) / 2,
            addresses["B"]: (1 / 5 + 20 / 120) / 2,
            addresses["C"]: (2 / 5 + 50 / 120) / 2,
        },
        abs=1e-12,
    )
    assert svc.epochs.mean_dividends(1) is None
    svc.round({v: scores(v, both, 31.0) for v in ("A", "C")}, now=31.0)  # B silent in epoch 1
    assert svc.epochs.mean_dividends(1)[addresses["B"]] < svc.epochs.mean_dividends(1)[addresses["A"]]


def test_bonds_survive_a_restart_and_dividends_go_on_as_if_none_happened(tmp_path, caplog):
    """A validator that scored a node early keeps the bonds it earned across a network restart: a
    consensus restarted from its bonds file gives the same dividends as one that never stopped."""
    stakes = {"A": 1.0, "B": 1.0, "C": 1.0}
    path = tmp_path / "bonds.json"
    both = {"x": 1.0, "y": 1.0}

    def scores(round_: int) -> dict[str, list[NodeScore]]:
        early = round_ == 0  # B scores y only at first: it joins the majority on x late
        return {
            v: [_score(v, n, w).model_copy(update={"at": float(round_)}) for n, w in weights.items()]
            for v, weights in ((v, {"y": 1.0} if v == "B" and early else both) for v in stakes)
        }

    steady = _service(stakes)
    for r in range(4):
        steady.round(scores(r), now=float(r))

    first = _service(stakes, bonds_path=path)
    for r in range(2):
        first.round(scores(r), now=float(r))
    restarted = _service(stakes, bonds_path=path)  # a new actor, same state folder
    for r in range(2, 4):
        restarted.round(scores(r), now=float(r))
    assert restarted._state.dividends() == pytest.approx(steady._state.dividends())
    assert restarted._state.dividends()["A"] > restarted._state.dividends()["B"]  # the late copier earns less

    fresh = _service(stakes)  # without the file: bonds start again and the difference shrinks
    for r in range(2, 4):
        fresh.round(scores(r), now=float(r))
    assert fresh._state.dividends() != pytest.approx(steady._state.dividends())

    path.write_text('{"epoch": 3, "bonds": [["A", "x", 7.5]]}')  # not a bond (> 1): refused, logged
    with caplog.at_level("WARNING"):
        assert _service(stakes, bonds_path=path)._state.saved().bonds == []
    assert "unreadable" in caplog.text

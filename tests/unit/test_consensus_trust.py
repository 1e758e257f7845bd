"""Issue 17, consensus v2: what no single validator can do. Stake comes from the network's config (or
the chain's stake record), an absent validator's stake still counts, half the stake cannot decide alone, and score reports are signed
(real eth-account keys) and checked. Plus the quality rule for unscored nodes. No Ray: the consensus
actor runs with fake validator actors."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from eth_account import Account

from deploy.config import NetworkConfig
from deploy.scoring import ValidatorSpec, validator_keys
from deploy.usage import settlement_default_quality
from scoring import ConsensusState, metrics
from scoring.consensus_service import ConsensusService
from scoring.report import ReportRefused, ScoreReport, accept_report, sign_report
from settlement.keys import SettlerKey
from settlement.rewards import NodeUsage, compute_rewards, epoch_quality
from tests.support.validator_fakes import node_scores


def _signed(key, validator: str, round_: int, weights: dict[str, float], now: float | None = None) -> str:
    now = time.time() if now is None else now
    report = ScoreReport(
        validator=validator,
        round=round_,
        issued_at_ms=int(now * 1000),
        scores=node_scores(validator, weights, now),
    )
    return sign_report(report, key).model_dump_json()


class _Validator:
    """A fake validator actor: `report.remote(round)` and `stake.remote()`, awaited as Ray handles are.
    `answer(round) -> str` makes the report; it may raise (a dead validator)."""

    def __init__(self, answer, stake: float = 1.0) -> None:
        self.calls: list[str] = []
        self._answer, self._stake = answer, stake
        self.report = SimpleNamespace(remote=self._report)
        self.stake = SimpleNamespace(remote=self._claim_stake)

    async def _report(self, round_: int) -> str:
        self.calls.append("report")
        return self._answer(round_)

    async def _claim_stake(self) -> float:
        self.calls.append("stake")
        return self._stake


def _honest(key, validator: str, weights: dict[str, float]) -> _Validator:
    return _Validator(lambda r: _signed(key, validator, r, weights))


def _dead(_round: int) -> str:
    raise RuntimeError("actor died")


def _service(stakes: dict[str, float], keys: dict, actors: dict) -> ConsensusService:
    return ConsensusService(
        stakes,
        {v: k.address for v, k in keys.items()},
        period_s=1.0,
        epoch_length_s=30.0,
        genesis=0.0,
        actor_of=actors.__getitem__,
    )


KEYS = {v: Account.create() for v in ("a", "b", "c")}
HONEST = {"good": 1.0, "cheat": 0.0}


# ---- half the stake, and absent stake -------------------------------------------------------------


def test_half_the_stake_cannot_set_a_node_quality_alone():
    """Validator a holds half the stake (2 of 4), kappa 0.5. Node x is as good as the reference node by
    a's verdict (quality 1.0) and at 0.2 of it by b and c's."""
    stakes = {"a": 2.0, "b": 1.0, "c": 1.0}
    a_says, others_say = {"x": 1.0, "ref": 1.0}, {"x": 0.2, "ref": 1.0}

    def quality(scores):
        return ConsensusState(stakes).step({v: node_scores(v, w, 0.0) for v, w in scores.items()}).quality

    # The other half disagrees: neither half's verdict is the consensus (an exact half is a tie: the
    # median is the midpoint). Subtensor's ">= kappa" would give a's higher value.
    split = quality({"a": a_says, "b": others_say, "c": others_say})
    assert 0.2 < split["x"] < 1.0 and split["ref"] == 1.0
    # downward too: a alone cannot zero a node the other half weights fully
    down = quality({"a": {"x": 0.0, "ref": 1.0}, "b": a_says, "c": a_says})
    assert 0.0 < down["x"] < 1.0
    # The other half is absent: whatever a says, no node is scored (not even at 0) on its word alone.
    assert quality({"a": a_says}) == {}
    assert quality({"a": {"x": 0.0, "ref": 1.0}}) == {}
    # Anyone joining a makes a majority (3/4): then a's verdict stands.
    assert quality({"a": a_says, "b": a_says, "c": others_say})["x"] == 1.0
    assert quality({"a": a_says, "b": a_says}) == {"x": 1.0, "ref": 1.0}


async def test_an_absent_validators_stake_still_counts():
    """a (half the stake) is dead. b and c hold the other half: they do not become 100% of the stake,
    so their verdicts alone score nothing; with a back, the same verdicts are a majority."""
    stakes = {"a": 2.0, "b": 1.0, "c": 1.0}
    actors = {
        "a": _Validator(_dead),
        "b": _honest(KEYS["b"], "b", HONEST),
        "c": _honest(KEYS["c"], "c", HONEST),
    }
    svc = _service(stakes, KEYS, actors)
    q = await svc.step()
    assert q is not None and q.quality == {}  # b + c = 1/2, not more than kappa
    assert list(svc._state.last.stake) == [0.5, 0.25, 0.25]  # a keeps its stake, with a zero row
    actors["a"] = _honest(KEYS["a"], "a", HONEST)
    assert (await svc.step()).quality == {"good": 1.0, "cheat": 0.0}
    # the pure rule: the denominator is every configured validator, answering or not
    state = ConsensusState({"a": 1.0, "b": 1.0, "c": 1.0})
    state.step({"b": node_scores("b", HONEST, 0.0)})
    assert list(state.last.stake) == pytest.approx([1 / 3] * 3)


async def test_a_validator_that_reports_a_fake_stake_cannot_change_its_weight():
    """c's actor claims a huge stake (and would answer `stake` if asked): consensus never asks, weights
    c by the configured 1.0, and refuses a report that carries a stake of its own."""
    stakes = {"a": 2.0, "b": 1.0, "c": 1.0}
    liar_weights = {"good": 0.0, "cheat": 1.0}

    async def run(c_actor):
        actors = {"a": _Validator(_dead), "b": _honest(KEYS["b"], "b", HONEST), "c": c_actor}
        svc = _service(stakes, KEYS, actors)
        return (await svc.step()).quality, svc

    liar = _Validator(lambda r: _signed(KEYS["c"], "c", r, liar_weights), stake=1e9)
    honest_stake = _Validator(lambda r: _signed(KEYS["c"], "c", r, liar_weights), stake=1.0)
    (q_liar, svc), (q_same, _) = await run(liar), await run(honest_stake)
    assert q_liar == q_same == {}  # b + c = 1/2 of the configured stake: nothing scored either way
    assert "stake" not in liar.calls and liar.calls == ["report"]
    assert list(svc._state.last.stake) == [0.5, 0.25, 0.25]

    def with_stake_field(r: int) -> str:
        data = json.loads(_signed(KEYS["c"], "c", r, liar_weights))
        data["report"]["stake"] = 1e9
        return json.dumps(data)

    refused = metrics.REPORTS_REFUSED.labels("c", "malformed")
    before = refused._value.get()
    q, _ = await run(_Validator(with_stake_field))
    assert q == {} and refused._value.get() == before + 1
    with pytest.raises(ValueError, match="stake"):
        ValidatorSpec(validator_id="c", stake=float("inf"))


async def test_the_chains_stake_record_decides_over_the_config():
    """With settlement on a chain, consensus weighs validators by the distributor's stake record (read
    through the settlement actor): a validator the admin unstaked loses its say, whatever the config
    gave it; a record with no stake at all (not written yet) leaves the config's stakes in use."""
    stakes = {"a": 2.0, "b": 1.0, "c": 1.0}
    a_says = {"good": 0.0, "cheat": 1.0}  # a, the config's half, would rank the cheat first
    actors = {
        "a": _Validator(lambda r: _signed(KEYS["a"], "a", r, a_says)),
        "b": _honest(KEYS["b"], "b", HONEST),
        "c": _honest(KEYS["c"], "c", HONEST),
    }
    svc = _service(stakes, KEYS, actors)
    svc.apply_stakes({})  # nothing recorded: the config's stakes stay
    assert list(svc._state.stake) == [2.0, 1.0, 1.0]
    svc.apply_stakes({KEYS["a"].address: 0, KEYS["b"].address: 3 * 10**18, KEYS["c"].address: 10**18})
    assert list(svc._state.stake) == [0.0, 3e18, 1e18]
    assert metrics.VALIDATOR_STAKE.labels("b")._value.get() == 3e18
    assert (await svc.step()).quality == {"good": 1.0, "cheat": 0.0}  # b and c decide; a weighs 0
    with pytest.raises(ValueError, match="configured validators"):
        svc._state.set_stakes({"a": 1.0})


# ---- signed reports -----------------------------------------------------------------------------


@pytest.mark.parametrize("forgery", ["other_key", "tampered", "old_round", "other_validator"])
async def test_a_forged_score_report_is_refused_and_does_not_change_quality(forgery):
    """a holds 3/5 of the stake: its report alone decides which nodes are scored. A forged report in
    a's name (the actor slot taken over, or a report changed in transit) must count as no answer."""
    stakes = {"a": 3.0, "b": 1.0, "c": 1.0}
    forged_weights = {"good": 0.0, "cheat": 1.0}
    mallory = Account.create()

    def forged(r: int) -> str:
        if forgery == "other_key":
            return _signed(mallory, "a", r, forged_weights)
        if forgery == "tampered":
            data = json.loads(_signed(KEYS["a"], "a", r, HONEST))
            for s in data["report"]["scores"]:
                s["score"] = forged_weights[s["node_id"]]
            return json.dumps(data)
        if forgery == "old_round":  # a genuine report of a's, replayed in a later round
            return _signed(KEYS["a"], "a", r - 1, forged_weights)
        return _signed(KEYS["b"], "b", r, forged_weights)  # b's genuine report passed off as a's

    reason = {"other_key": "bad_signature", "tampered": "bad_signature", "old_round": "stale"}
    counter = metrics.REPORTS_REFUSED.labels("a", reason.get(forgery, "wrong_validator"))
    before = counter._value.get()
    others = {"b": _honest(KEYS["b"], "b", HONEST), "c": _honest(KEYS["c"], "c", HONEST)}
    q = await _service(stakes, KEYS, {"a": _Validator(forged), **others}).step()
    assert counter._value.get() == before + 1
    absent = await _service(stakes, KEYS, {"a": _Validator(_dead), **others}).step()
    assert q.quality == absent.quality == {}  # as if a had not answered: b + c alone score nothing
    # had it been accepted, the forgery would have decided: the cheater scored, the honest node not
    accepted = _service(stakes, KEYS, {}).round(
        {
            "a": list(node_scores("a", forged_weights, time.time())),
            "b": list(node_scores("b", HONEST, time.time())),
        },
        time.time(),
    )
    assert accepted[0].quality["cheat"] > accepted[0].quality["good"]
    # and a's own genuine report is accepted
    honest = await _service(stakes, KEYS, {"a": _honest(KEYS["a"], "a", HONEST), **others}).step()
    assert honest.quality == {"good": 1.0, "cheat": 0.0}


def test_accept_report_checks_signer_round_and_age():
    key, now = KEYS["a"], 1_000_000.0
    text = _signed(key, "a", 7, HONEST, now=now)
    assert [s.node_id for s in accept_report(text, "a", key.address, 7, now + 5, 10)] == ["good", "cheat"]
    for args, reason in [
        (("a", KEYS["b"].address, 7, now), "bad_signature"),
        (("b", key.address, 7, now), "wrong_validator"),
        (("a", key.address, 8, now), "stale"),
        (("a", key.address, 7, now + 11), "stale"),
        (("a", key.address, 7, now - 11), "stale"),  # from the future
    ]:
        with pytest.raises(ReportRefused) as exc:
            accept_report(text, *args, 10)
        assert exc.value.reason == reason, args
    nan = text.replace('"score":1.0', '"score":NaN')
    for bad in ("not json", "{}", nan, text[:-3], "x" * (9 << 20)):
        with pytest.raises(ReportRefused) as exc:
            accept_report(bad, "a", key.address, 7, now, 10)
        assert exc.value.reason in ("malformed", "bad_signature")


def test_validator_keys_are_generated_once_private_and_loadable(tmp_path):
    specs = [ValidatorSpec(validator_id="v1"), ValidatorSpec(validator_id="v2")]
    keys = validator_keys(specs, tmp_path / "validator-keys")
    assert keys["v1"].address != keys["v2"].address
    assert (keys["v1"].path.stat().st_mode & 0o777) == 0o600
    assert validator_keys(specs, tmp_path / "validator-keys") == keys  # kept across restarts
    key = SettlerKey.from_file(keys["v1"].path, what="validator key")
    text = _signed(key, "v1", 1, HONEST)
    assert accept_report(text, "v1", keys["v1"].address, 1, time.time(), 10)
    with pytest.raises(ValueError, match="validator_id"):
        ValidatorSpec(validator_id="../v1")
    with pytest.raises(ValueError, match="twice"):
        NetworkConfig(validators=[{"validator_id": "v1"}, {"validator_id": "v1"}])


# ---- quality of unscored nodes ------------------------------------------------------------------


def test_unscored_nodes_are_on_probation_with_validators_and_paid_at_one_without():
    usage = {"scored": NodeUsage("0xop1", 100, 100), "unscored": NodeUsage("0xop2", 100, 100)}
    consensus = {"scored": 1.0}  # the epoch's mean consensus quality: no round scored "unscored"

    with_validators = NetworkConfig(validators=[{"validator_id": "v1"}])
    q = epoch_quality(usage, consensus, settlement_default_quality(with_validators))
    assert q == {"scored": 1.0, "unscored": 0.0}
    assert compute_rewards(usage, q, 1000, 1, 1).per_node == {"scored": 1000, "unscored": 0}

    demo = NetworkConfig()
    q = epoch_quality(usage, None, settlement_default_quality(demo))  # no validators: no scores at all
    assert q == {"scored": 1.0, "unscored": 1.0}
    assert compute_rewards(usage, q, 1000, 1, 1).per_node == {"scored": 500, "unscored": 500}


@pytest.mark.parametrize(("cutoff", "cheat_quality"), [(None, 1.0), (900.0, None)])
def test_a_stale_score_is_dropped_by_the_activity_cutoff(cutoff, cheat_quality):
    """v1 (3/5 of the stake) last scored 'cheat' 1,000 s ago and has stopped observing it; v2 and v3
    score it 0 now. Kept, v1's old vote alone is a kappa-majority and lifts cheat to the best node's
    quality; past the 900 s cutoff it is no vote at all, and the rest (2/5) cannot score cheat yet."""
    now = 1000.0
    state = ConsensusState({"v1": 3.0, "v2": 1.0, "v3": 1.0}, activity_cutoff_s=cutoff)
    scores = {
        "v1": (*node_scores("v1", {"a": 1.0}, now), *node_scores("v1", {"cheat": 1.0}, 0.0)),
        "v2": node_scores("v2", {"a": 1.0, "cheat": 0.0}, now),
        "v3": node_scores("v3", {"a": 1.0, "cheat": 0.0}, now),
    }
    quality = state.step(scores, now=now).quality
    assert quality.get("cheat") == cheat_quality and quality["a"] == 1.0


def test_a_validator_brings_its_own_key_file_or_keystore(tmp_path, monkeypatch):
    """Issue 27: a validator's key (the address its dividends go to) may be its own, hex or keystore; a
    key file others can read is refused, and nothing is generated for it."""
    own = SettlerKey.generate()
    hex_file = tmp_path / "v1.key"
    hex_file.write_text(own.export_hex())
    hex_file.chmod(0o600)
    stored = SettlerKey.generate()
    keystore, passphrase = tmp_path / "v2.json", tmp_path / "passphrase"
    keystore.write_text(json.dumps(stored.export_keystore("s3cret")))
    passphrase.write_text("s3cret\n")
    keystore.chmod(0o600)
    passphrase.chmod(0o600)
    monkeypatch.setenv("MERITNET_KEY_PASSWORD_FILE", str(passphrase))
    specs = [
        ValidatorSpec(validator_id="v1", key_file=hex_file),
        ValidatorSpec(validator_id="v2", key_file=keystore),
    ]
    keys = validator_keys(specs, tmp_path / "validator-keys")
    assert (keys["v1"].address, keys["v1"].path) == (own.address, hex_file)
    assert (keys["v2"].address, keys["v2"].path) == (stored.address, keystore)
    assert not list((tmp_path / "validator-keys").iterdir())
    hex_file.chmod(0o644)
    with pytest.raises(ValueError, match="validator key"):
        validator_keys(specs[:1], tmp_path / "validator-keys")

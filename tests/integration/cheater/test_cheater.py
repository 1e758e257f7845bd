"""Issues 5 and 15 on the real cluster: a node serving other weights than it claims, and one serving a
4-bit quantization of the claimed model, are caught by validators verifying against the trusted
reference engine, lose their consensus quality, get no organic traffic and no reward; the honest nodes
are never convicted while organic load runs, although one of them (l4-b, float32) computes differently
from the validators' bfloat16 reference (issue 26)."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import random
import threading
import time
import urllib.request
from collections import Counter

import pytest

from tests.support.cheater_network import (
    CHEATER,
    CHEATER_OP,
    HONEST_A,
    HONEST_B,
    HONEST_NODES,
    QUANT,
    QUANT_OP,
)
from tests.support.tools import NOTE_TOOL

pytestmark = pytest.mark.integration

MIN_HONEST_VERIFICATIONS = 200
MAX_CHALLENGES_TO_DETECT = 3  # substitution is fraud on the first verified completion; 3 leaves slack
MAX_CHALLENGES_TO_DETECT_QUANT = 16  # int4: benchmarks.verification measures how many it takes


TOWN = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "people": {"type": "integer"}},
    "required": ["name", "people"],
}


def _client(net):
    from openai import OpenAI

    return OpenAI(base_url=f"{net.base_url}/v1", api_key="unused", max_retries=0, timeout=180)


def _organic(client, i: int) -> str:
    """One organic request (chat; chat with a JSON schema, or with a tool and tool_choice required, named
    or auto; or completion; greedy); returns the serving node's id."""
    rng = random.Random(i)
    if i % 4 == 3:  # a quarter: enough tool calls that every run shadow-checks some
        raw = client.chat.completions.with_raw_response.create(
            model="default",
            messages=[{"role": "user", "content": f"Save a note about town {i}."}],
            max_tokens=32,
            temperature=0,
            tools=[NOTE_TOOL],  # a free string argument: the call carries evidence of the model
            tool_choice=("required", {"type": "function", "function": {"name": "save_note"}}, "auto")[
                i // 4 % 3
            ],
        )
    elif i % 8 == 1:
        raw = client.chat.completions.with_raw_response.create(
            model="default",
            messages=[{"role": "user", "content": f"Describe town number {i} as JSON."}],
            max_tokens=rng.choice((16, 32)),
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "town", "schema": TOWN}},
        )
    elif i % 2:
        raw = client.chat.completions.with_raw_response.create(
            model="default",
            messages=[{"role": "user", "content": f"Tell me about town number {i}."}],
            max_tokens=rng.choice((8, 16, 32)),
            temperature=0,
        )
    else:
        raw = client.completions.with_raw_response.create(
            model="default",
            prompt=f"The story of house {i} begins",
            max_tokens=rng.choice((8, 16, 32)),
            temperature=0,
        )
    return raw.headers["x-meritnet-node"]


def _consensus(net):
    import ray

    q = ray.get(net.consensus.latest.remote())
    return {} if q is None else dict(q.quality)


def _stats(net) -> dict[str, dict[str, dict[str, int]]]:
    import ray

    return dict(zip(net.validators, ray.get([a.stats.remote() for a in net.validators.values()])))


def _verified(stats, nodes) -> Counter:
    total: Counter = Counter()
    for per_node in stats.values():
        for node in nodes:
            c = per_node.get(node, {})
            total.update(
                {
                    k: c.get(k, 0)
                    for k in (
                        "pass",
                        "fail",
                        "fraud",
                        "challenges",
                        "answered",
                        "shadow",
                        "shadow_pass",
                        "shadow_fail",
                        "shadow_fraud",
                        "shadow_json",
                        "shadow_tools",
                    )
                }
            )
    return total


@pytest.fixture(scope="module")
def detection(cheater_network):
    """Organic load runs (4 concurrent clients) while validators challenge every node, until the cheater
    is at consensus quality 0 and the honest nodes have >= 200 verified completions."""
    net = cheater_network
    client = _client(net)
    stop = threading.Event()
    served: Counter = Counter()
    errors: list[str] = []
    ids = itertools.count()

    def load():
        while not stop.is_set():
            try:
                served[_organic(client, next(ids))] += 1
            except Exception as exc:  # noqa: BLE001 - counted and asserted on below
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    t0 = time.monotonic()
    detected_at = None
    with cf.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load) for _ in range(4)]
        deadline = time.monotonic() + 360
        while time.monotonic() < deadline:
            time.sleep(2)
            quality, stats = _consensus(net), _stats(net)
            if detected_at is None and quality.get(CHEATER) == 0.0 and quality.get(QUANT) == 0.0:
                detected_at = time.time()
            honest = _verified(stats, HONEST_NODES)
            if (
                detected_at is not None
                and honest["pass"] + honest["fail"] + honest["fraud"] >= MIN_HONEST_VERIFICATIONS
            ):
                break
        stop.set()
        for w in workers:
            w.result()
    import ray

    stats = _stats(net)
    result = {
        "detected_at": detected_at,
        "seconds": time.monotonic() - t0,
        "stats": stats,
        "honest": _verified(stats, HONEST_NODES),
        "cheater": _verified(stats, (CHEATER,)),
        "quant": _verified(stats, (QUANT,)),
        "organic_served": dict(served),
        "organic_errors": errors,
        "quality": _consensus(net),
        "reference_engine": ray.get(net.reference_engines["default"].stats.remote()),
        "shadow_feed": ray.get(net.shadow_feed.stats.remote()),
    }
    print("\ndetection phase:", json.dumps({k: v for k, v in result.items() if k != "stats"}, default=str))
    print("validator stats:", json.dumps(stats))
    return result


def test_cheater_caught_within_bounded_challenges(detection):
    assert detection["detected_at"] is not None, (
        f"cheater never reached consensus quality 0: {detection['quality']}"
    )
    for validator, per_node in detection["stats"].items():
        after = per_node.get(CHEATER, {}).get("detected_after")
        assert after is not None and after <= MAX_CHALLENGES_TO_DETECT, (validator, per_node.get(CHEATER))
    assert detection["cheater"]["pass"] == 0, detection["cheater"]
    assert detection["quality"][CHEATER] == 0.0


def test_int4_quantized_node_caught(detection):
    """The subtle cheat: the claimed model's own weights at 4 bits. Its greedy argmax and its seeded
    samples drift from the reference's within a few challenges."""
    assert detection["quality"].get(QUANT) == 0.0, detection["quality"]
    for validator, per_node in detection["stats"].items():
        after = per_node.get(QUANT, {}).get("detected_after")
        assert after is not None and after <= MAX_CHALLENGES_TO_DETECT_QUANT, (validator, per_node.get(QUANT))


def test_honest_nodes_are_never_convicted_under_load(detection):
    """Issue 26: l4-b computes in float32 against the validators' bfloat16 reference, so its tokens differ
    from the reference's by honest float noise. A single completion's verdict is evidence ('fail' leans
    toward a cheat); what must never happen to an honest node is a conviction or a fraud verdict."""
    honest = detection["honest"]
    verified = honest["pass"] + honest["fail"] + honest["fraud"]
    assert verified >= MIN_HONEST_VERIFICATIONS, f"only {verified} honest verifications: {dict(honest)}"
    assert honest["fraud"] == 0, f"false fraud: {dict(honest)}"
    for validator, per_node in detection["stats"].items():
        for node in HONEST_NODES:
            assert "detected_after" not in per_node.get(node, {}), (validator, node, per_node.get(node))
    assert not detection["organic_errors"], detection["organic_errors"][:5]  # every client request served
    assert sum(detection["organic_served"].values()) >= 20, detection["organic_served"]  # load really ran
    for node in HONEST_NODES:
        assert detection["quality"][node] > 0.9, detection["quality"]


def test_organic_traffic_is_shadow_verified_without_false_positives(detection):
    """Validators re-verify a sample of organic completions after the fact (shadow verification),
    structured (json_schema) answers among them."""
    honest, cheater = detection["honest"], detection["cheater"]
    assert detection["shadow_feed"]["offered"] > 0, detection["shadow_feed"]
    assert honest["shadow"] > 0, (
        f"no organic completion of an honest node was shadow-verified: {dict(honest)}"
    )
    assert honest["shadow_fraud"] == 0, f"shadow false fraud: {dict(honest)}"
    # an eighth of the organic requests ask for a JSON schema, a quarter for a tool call
    assert honest["shadow_json"] > 0 and honest["shadow_tools"] > 0, dict(honest)
    assert cheater["shadow_pass"] == 0, dict(cheater)  # whatever of the cheater's organic output was sampled


def test_cheater_gets_under_one_percent_of_organic_traffic(cheater_network, detection):
    time.sleep(2.0)  # the gateway pulls consensus every 0.5 s
    client = _client(cheater_network)
    with cf.ThreadPoolExecutor(8) as pool:
        served = Counter(pool.map(lambda i: _organic(client, 10_000 + i), range(200)))
    print("\ntraffic after detection:", dict(served))
    assert served[CHEATER] / sum(served.values()) < 0.01, served
    assert served[QUANT] / sum(served.values()) < 0.01, served
    assert all(served[n] > 0 for n in HONEST_NODES), served


def test_scoring_metrics_are_served(cheater_network):
    import ray

    net = cheater_network
    text = ray.get(net.consensus.metrics_text.remote())
    assert f'meritnet_node_consensus_quality{{node="{CHEATER}"}} 0.0' in text, text[:2000]
    for v in ("v1", "v2", "v3"):  # rows are validator ids
        assert f'meritnet_validator_trust{{validator="{v}"}}' in text
        assert f'meritnet_node_integrity{{node="{CHEATER}",validator="{v}"}} 0.0' in text
    # Stakes come from the chain's record, which the network wrote from its YAML (v1 2.0, v2 and v3 1.0).
    from prometheus_client.parser import text_string_to_metric_families

    stakes = {
        s.labels["validator"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "meritnet_validator_stake"
        for s in f.samples
    }
    assert stakes == {"v1": 2e18, "v2": 1e18, "v3": 1e18}, stakes
    port = net.config.scoring_metrics_port
    http_text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "meritnet_node_availability" in http_text and "meritnet_node_speed" in http_text


def test_cheater_earns_nothing_in_the_next_settled_epoch(cheater_network, detection):
    from settlement import UsageLedger

    net = cheater_network
    ledger = UsageLedger(net.ledger_path, net.config.epoch_length_s, genesis=net.genesis)
    epoch = ledger.epoch_of(detection["detected_at"]) + 1  # the first epoch wholly after detection
    _, end = ledger.epoch_bounds(epoch)
    time.sleep(max(0.0, end - time.time()) + 1.0)
    deadline = time.monotonic() + 120
    rewards = None
    while time.monotonic() < deadline and (rewards is None or ledger.settled(epoch) is None):
        net.settle_due_epochs()
        rewards = ledger.rewards(epoch)
        time.sleep(1)
    assert rewards is not None and ledger.settled(epoch), f"epoch {epoch} was not settled"
    per_operator, _carried = rewards
    usage = ledger.usage_by_node(epoch)
    print(f"\nepoch {epoch}: rewards {per_operator}; usage nodes {sorted(usage)}")
    assert CHEATER in usage, (
        "the cheater had no metered usage (challenges) in the epoch: the test proves nothing"
    )
    assert per_operator.get(CHEATER_OP, 0) == 0, per_operator
    assert per_operator.get(QUANT_OP, 0) == 0, per_operator
    assert per_operator.get(HONEST_A, 0) > 0 and per_operator.get(HONEST_B, 0) > 0, per_operator

    # Validators are paid in the same settled epoch, from the same emission, in the same reward tree.
    from deploy.scoring import validator_keys
    from settlement.rewardbook import RewardBook

    book = RewardBook.beside(net.ledger_path)
    try:
        c = book.get(epoch)
    finally:
        book.close()
    keys = validator_keys(net.config.validators, net.config.state_dir / "validator-keys")
    addresses = {k.address.lower() for k in keys.values()}
    paid = {a.lower(): wei for a, wei in c.validator_rewards.items()}
    print(f"validators' rewards {paid}")
    assert set(paid) == addresses and all(wei > 0 for wei in paid.values()), paid
    assert sum(c.operator_rewards.values()) + sum(paid.values()) == c.epoch_reward
    assert all(c.cumulative.get(a, 0) >= wei for a, wei in c.validator_rewards.items())  # claimable

"""Validators verify embeddings nodes (issue 30): the reference recomputes each challenge's vectors and a
node's vectors are judged by cosine. Honest float noise passes, another model's vectors are fraud at once,
a slightly wrong model is convicted by the sequential test, and a malformed answer is fraud. With fake
I/O; the real engines run in tests/integration/network/test_embeddings.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cluster.records import NodeStats
from scoring.challenge_client import ChallengeResponse, parse_vectors
from scoring.embeddings import EmbeddingThresholds, cosine, verify_embeddings
from scoring.thresholds import VerifyThresholds
from scoring.validator import Validator, ValidatorConfig

OP = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
MODEL = "emb"


class Embedder:
    """A fake embeddings model: a text's hashed bag of words through a fixed random projection (seed),
    normalised; `noise` adds honest-float-sized jitter, `drift` a model that is slightly off."""

    def __init__(self, seed: int, noise: float = 0.0, drift: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.proj = rng.normal(size=(64, 32))
        self.proj += drift * np.random.default_rng(99).normal(size=self.proj.shape)
        self.noise, self.rng = noise, np.random.default_rng(seed + 1000)

    def embed(self, inputs):
        out = []
        for text in inputs:
            bag = np.zeros(64)
            for word in text.split():
                bag[hash(word) % 64] += 1.0
            v = bag @ self.proj + self.noise * self.rng.normal(size=32)
            out.append((v / np.linalg.norm(v)).tolist())
        return out


def _node(node_id: str) -> NodeStats:
    return NodeStats(
        node_id=node_id,
        model_id=MODEL,
        operator=OP,
        accelerator_type="L4",
        capacity=8,
        live=True,
        running_replicas=1,
        joined_at=0.0,
        task="embed",
    )


def _validator(nodes: dict[str, Embedder], broken: set[str] = frozenset()) -> Validator:
    async def send(req):
        assert req.path == "/v1/embeddings" and req.body["encoding_format"] == "float"
        if req.node_id in broken:
            return ChallengeResponse(ok=True, status=200, malformed="malformed completion (1 invalid fields)")
        vectors = tuple(tuple(v) for v in nodes[req.node_id].embed(req.body["input"]))
        return ChallengeResponse(ok=True, status=200, vectors=vectors, ttft_s=0.01, elapsed_s=0.01)

    return Validator(ValidatorConfig(validator_id="v0"), send, {MODEL: Embedder(0)}, {}, rng=random.Random(1))


def test_cosine_and_verdicts():
    th, vt = EmbeddingThresholds(), VerifyThresholds()
    a = [1.0, 0.0, 0.0]
    assert cosine(a, a) == pytest.approx(1.0) and cosine(a, [0.0, 1.0, 0.0]) == 0.0
    assert verify_embeddings([a], [a], th, vt).verdict == "pass"
    assert verify_embeddings([[1.0, 0.2, 0.0]], [a], th, vt).verdict == "fail"  # cosine 0.98
    assert verify_embeddings([[0.0, 1.0, 0.0]], [a], th, vt).verdict == "fraud"  # another model
    assert verify_embeddings([a, a], [a], th, vt).evidence.fraud  # a vector too many
    assert verify_embeddings([[1.0, 0.0]], [a], th, vt).evidence.fraud  # another width


async def test_honest_noisy_nodes_keep_full_scores_and_other_models_are_convicted():
    nodes = {
        "honest": Embedder(0),
        "noisy": Embedder(0, noise=1e-3),  # float noise: cosine ~0.99999
        "other-model": Embedder(1),  # substituted weights
        "off": Embedder(0, drift=0.15),  # a degraded copy (e.g. coarse quantisation): cosine ~0.98
        "broken": Embedder(0),
    }
    v = _validator(nodes, broken={"broken"})
    for _ in range(30):
        for node_id in nodes:
            await v.challenge_once(_node(node_id))
    scores = {s.node_id: s for s in v.scores()}
    assert scores["honest"].integrity == 1.0 and scores["noisy"].integrity == 1.0
    assert scores["honest"].availability == 1.0
    for cheat in ("other-model", "off", "broken"):
        assert scores[cheat].integrity == 0.0, cheat
    assert v.counts["other-model"]["fraud"] >= 1 and v.counts["honest"]["pass"] == 30
    assert v.counts["off"]["fail"] >= 1


async def test_a_node_honest_on_challenges_but_not_on_organic_traffic_is_caught_by_shadow_checks():
    from cluster.records import ServedEmbedding
    from scoring.challenge import ChallengeConfig

    texts = ("the cat sat on the mat", "a dog barked", "rain again today")
    honest, other = Embedder(0), Embedder(1)  # the node answers organic requests with another model
    v = Validator(
        ValidatorConfig(validator_id="v0", challenge=ChallengeConfig(shadow_rate=1.0)),
        None,
        {MODEL: Embedder(0)},
        {},
        rng=random.Random(1),
    )

    def served(rid: str, node_id: str, model) -> ServedEmbedding:
        vectors = tuple(tuple(x) for x in model.embed(texts))
        return ServedEmbedding(request_id=rid, node_id=node_id, model=MODEL, inputs=texts, vectors=vectors)

    verdicts = [(await v.shadow_verify(served(f"h{i}", "honest", honest))).verdict for i in range(3)]
    assert verdicts == ["pass"] * 3
    assert (await v.shadow_verify(served("c0", "cheat", other))).verdict == "fraud"
    assert v.counts["honest"]["shadow_pass"] == 3 and v.counts["cheat"]["shadow_fraud"] == 1
    scores = {s.node_id: s for s in v.scores()}
    assert scores["honest"].integrity == 1.0 and scores["cheat"].integrity == 0.0


async def test_a_failing_reference_is_no_verdict():
    class Down:
        def embed(self, inputs):
            raise RuntimeError("engine died")

    async def send(req):
        vectors = tuple(tuple(v) for v in Embedder(1).embed(req.body["input"]))
        return ChallengeResponse(ok=True, status=200, vectors=vectors, elapsed_s=0.01)

    v = Validator(ValidatorConfig(validator_id="v0"), send, {MODEL: Down()}, {}, rng=random.Random(1))
    out = await v.challenge_once(_node("n"))
    assert out.verification is None and v.counts["n"]["verify_error"] == 1
    assert v.counts["n"]["fraud"] == 0


def test_the_challenge_client_reads_vectors_strictly():
    good = b'{"data":[{"index":1,"embedding":[0.0,1.0]},{"index":0,"embedding":[1.0,0.0]}]}'
    assert parse_vectors(good, 2, 0.1).vectors == ((1.0, 0.0), (0.0, 1.0))
    assert parse_vectors(b'{"data":[{"index":0,"embedding":[1.0]}]}', 2, 0.1).malformed
    assert parse_vectors(b"not json", 1, 0.1).malformed
    refused = parse_vectors(b'{"error":{"message":"busy","code":503}}', 1, 0.1)
    assert not refused.ok and not refused.malformed

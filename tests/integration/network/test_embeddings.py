"""/v1/embeddings on the real network (issue 30), with the official openai client: `make demo`'s
embeddings node (the built model run by vLLM as a pooling model) answers batches in float and base64,
the gateway bills its own count of the inputs' tokens, and each model serves only its own task."""

from __future__ import annotations

import math

import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "default-embed"
TEXTS = ["the cat sat on the mat", "a completely different sentence about ships", "the cat sat on the mat"]


def _tokens(network, texts: list[str]) -> int:
    """The inputs' tokens by the trusted tokenizer, special tokens included (as vLLM embeds them)."""
    from transformers import AutoTokenizer

    from deploy.config import resolve_model_source

    tok = AutoTokenizer.from_pretrained(resolve_model_source(network.config.embedding_models[MODEL]))
    return sum(len(tok.encode(t, add_special_tokens=True)) for t in texts)


def test_a_batch_comes_back_in_order_as_unit_vectors_billed_by_the_gateway(network, client, usage_records):
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS, encoding_format="float")
    done = raw.parse()
    vectors = [d.embedding for d in done.data]
    assert [d.index for d in done.data] == [0, 1, 2]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 1
    for v in vectors:
        assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-3)  # vLLM normalises
    same = math.fsum(a * b for a, b in zip(vectors[0], vectors[2], strict=True))
    other = math.fsum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    assert same > 0.999 and other < same  # one text, one vector; another text, another vector
    assert done.usage.prompt_tokens == done.usage.total_tokens == _tokens(network, TEXTS)
    record = usage_records()[raw.headers["x-meritnet-request-id"]]
    assert (record.node_id, record.model, record.status) == ("l4-embed", MODEL, "ok")
    assert (record.prompt_tokens, record.completion_tokens) == (done.usage.prompt_tokens, 0)


def test_base64_vectors_decode_to_the_float_ones(client):
    # the openai client asks for base64 when no encoding is given, and decodes it itself
    packed = client.embeddings.create(model=MODEL, input=TEXTS[:2])
    plain = client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="float")
    for a, b in zip(packed.data, plain.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)


def test_token_inputs_and_truncation(client):
    ids = client.embeddings.create(model=MODEL, input=[[5, 6, 7, 8], [9, 10]], encoding_format="float")
    assert ids.usage.prompt_tokens == 6 and len(ids.data) == 2
    cut = client.embeddings.create(
        model=MODEL, input="one two three four five six seven", extra_body={"truncate_prompt_tokens": 3}
    )
    assert cut.usage.prompt_tokens == 3


def test_each_model_serves_only_its_task_and_says_so(client):
    with pytest.raises(openai.BadRequestError, match="embeddings only"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    with pytest.raises(openai.BadRequestError, match="not embeddings"):
        client.embeddings.create(model="default", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[])
    assert client.models.retrieve(MODEL).model_extra["capabilities"] == ["embeddings"]


def test_a_validator_recomputes_the_vectors_and_passes_the_honest_node(network, client):
    """A validator (scoring.Validator, its own fp32 reference engine in this process) challenges the
    demo's bf16 embeddings node through the gateway: every verdict passes, the node keeps integrity 1.
    It shadow-verifies an organic answer the official client got (what the gateway offers validators):
    as served it passes; the same answer with the vectors swapped between its two texts does not.
    Cheats against real engines are measured in benchmarks.embeddings (RESULTS.md)."""
    import asyncio
    import gc
    import random

    import httpx

    from cluster.records import NodeStats, ServedEmbedding
    from deploy.config import resolve_model_source
    from scoring.challenge import ChallengeConfig
    from scoring.challenge_client import http_send
    from scoring.embeddings import VllmEmbeddingReference
    from scoring.validator import Validator, ValidatorConfig

    source = resolve_model_source(network.config.embedding_models[MODEL])
    reference = VllmEmbeddingReference(
        source, {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    )
    try:
        listed = httpx.get(f"{network.base_url}/v1/nodes", timeout=30).json()["data"]
        node = NodeStats.model_validate(next(n for n in listed if n["node_id"] == "l4-embed"), strict=False)
        validator = Validator(
            ValidatorConfig(validator_id="t", challenge=ChallengeConfig(shadow_rate=1.0)),
            http_send(network.base_url, network.challenge_key),
            {MODEL: reference},
            {},
            rng=random.Random(3),
        )

        async def challenge(times: int):
            return [await validator.challenge_once(node) for _ in range(times)]

        outcomes = asyncio.run(challenge(12))
        (score,) = validator.scores()
        texts = TEXTS[:2]
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=texts, encoding_format="float")
        vectors = tuple(tuple(d.embedding) for d in raw.parse().data)
        rid = raw.headers["x-meritnet-request-id"]
        organic = ServedEmbedding(
            request_id=rid, node_id="l4-embed", model=MODEL, inputs=tuple(texts), vectors=vectors
        )
        swapped = organic.model_copy(update={"request_id": rid + "-x", "vectors": vectors[::-1]})
        shadow = [asyncio.run(validator.shadow_verify(item)) for item in (organic, swapped)]
    finally:
        del reference
        gc.collect()
    verdicts = [o.verification.verdict for o in outcomes if o.verification is not None]
    assert verdicts == ["pass"] * 12, [o.verification for o in outcomes]
    assert all(o.verification.max_margin < 1e-3 for o in outcomes)  # cosine > 0.999 for every input
    assert score.integrity == 1.0 and score.availability == 1.0
    assert shadow[0].verdict == "pass" and shadow[1].verdict in ("fail", "fraud"), shadow

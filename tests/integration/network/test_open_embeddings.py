"""An operator's embeddings node (issue 30): an open node joins with a model the network lists among its
`embedding_models`, and the gateway serves `/v1/embeddings` from it over HTTP, billing its own count of
the inputs' tokens (never the node's) and refusing a lying answer. The node is a real HTTP server
(tests/support/liar_node.py); the official openai client calls the network."""

from __future__ import annotations

import openai
import pytest

from tests.support.liar_node import HUGE, http_embedder, open_node, wait_live

pytestmark = pytest.mark.integration

MODEL = "open-embed"


@pytest.fixture(scope="module")
def embed_node(network):
    node = open_node(network, http_embedder(MODEL), MODEL, "op-embed")
    node_id = next(node)
    wait_live(network, node_id)
    yield node_id
    next(node, None)


def test_it_joins_as_an_embeddings_node_and_serves_embeddings(network, client, embed_node, usage_records):
    import httpx

    listed = {n["node_id"]: n for n in httpx.get(f"{network.base_url}/v1/nodes", timeout=30).json()["data"]}
    assert (listed[embed_node]["task"], listed[embed_node]["kind"]) == ("embed", "open")
    raw = client.embeddings.with_raw_response.create(
        model=MODEL, input=["ab", "abc"], encoding_format="float"
    )
    done = raw.parse()
    assert raw.headers["x-meritnet-node"] == embed_node
    assert [d.embedding.index(1.0) for d in done.data] == [2, 3]  # the node's vectors, in order
    assert 0 < done.usage.prompt_tokens < HUGE  # the gateway's count, not the node's
    record = usage_records()[raw.headers["x-meritnet-request-id"]]
    assert (record.node_id, record.status, record.prompt_tokens) == (
        embed_node,
        "ok",
        done.usage.prompt_tokens,
    )
    packed = client.embeddings.create(model=MODEL, input="abcd")  # the client asks for base64 and decodes
    assert packed.data[0].embedding.index(1.0) == 4


def test_a_lying_answer_is_refused_and_not_billed(client, embed_node, usage_records):
    before = set(usage_records())
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model=MODEL, input=["short one", "two"], encoding_format="float")
    assert info.value.status_code == 503
    new = [usage_records()[rid] for rid in set(usage_records()) - before]
    assert all(r.status != "ok" for r in new)


def test_chat_with_an_embeddings_model_is_refused(client, embed_node):
    with pytest.raises(openai.BadRequestError, match="embeddings only"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

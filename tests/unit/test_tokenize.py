"""POST /tokenize and /detokenize (routing/tokenize.py) on the gateway, with the built-in model's real
tokenizer and chat template: the counts a client gets are the ones metering bills."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.metering import MeteredModel, TokenCounter
from routing.selection import load_selector
from tests.support.gateway_fakes import FakeNode, node_stats


@pytest.fixture(scope="module")
def client():
    from cluster.model import build_default_model

    counter = TokenCounter.load(MeteredModel(source=str(build_default_model(0)), max_model_len=1024))
    core = GatewayCore(
        GatewayConfig(),
        load_selector(registry=None),
        {"a": FakeNode("a")}.__getitem__,
        None,
        counters={"default": counter},
    )
    core.set_nodes([node_stats("a")])
    c = TestClient(build_fastapi(lambda: core))
    c.counter = counter
    return c


def test_a_prompt_tokenizes_as_metering_counts_it_and_detokenizes_back(client):
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    prompt = "The river town kept its lamps lit all night."
    r = client.post("/tokenize", json={"model": "default", "prompt": prompt, "return_token_strs": True})
    assert r.status_code == 200, r.text
    got = r.json()
    billed = client.counter.prompt_tokens(CompletionRequest(model="default", prompt=prompt))
    assert got["count"] == len(got["tokens"]) == billed and got["max_model_len"] == 1024
    assert len(got["token_strs"]) == got["count"]
    back = client.post("/detokenize", json={"model": "default", "tokens": got["tokens"]}).json()["prompt"]
    assert prompt in back

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    chat = client.post("/tokenize", json={"model": "default", "messages": messages}).json()
    billed = client.counter.prompt_tokens(ChatCompletionRequest(model="default", messages=messages))
    assert chat["count"] == billed > got["count"]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/tokenize", {"model": "gpt-9", "prompt": "hi"}, 404, "model_not_found"),
        ("/tokenize", {"prompt": "hi"}, 400, None),
        ("/tokenize", {"model": "default", "prompt": 7}, 400, None),
        ("/detokenize", {"model": "default", "tokens": [2**40]}, 400, None),
        ("/detokenize", {"model": "default", "tokens": [-1]}, 400, None),
        ("/detokenize", {"model": "default", "tokens": [1] * 2000}, 400, None),
    ],
)
def test_bad_requests_get_an_openai_shaped_4xx(client, path, body, status, code):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)


def test_a_forwarded_request_is_refused(client):
    r = client.post("/tokenize", json={"model": "default", "prompt": "hi"}, headers={"x-meritnet-hop": "1"})
    assert 400 <= r.status_code < 500

"""A lying node on the real network (issue 10): it inflates its usage, returns ids outside the
vocabulary, and sends malformed chunks. Clients get clean answers or clean OpenAI errors; the ledger
holds only what the gateway counted of what it really forwarded."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.integration.network.liar import LIAR_ID, LIAR_MODEL, TEXT, liar_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def liar(network):
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from cluster.records import NodeSpec
    from cluster.registry import get_registry
    from deploy.network import resolve_model_source

    tok = AutoTokenizer.from_pretrained(resolve_model_source("builtin:default"))
    serve.run(liar_app(tok.encode(TEXT, add_special_tokens=False)), name=f"node-{LIAR_ID}", route_prefix=None)
    spec = NodeSpec(
        node_id=LIAR_ID,
        operator="0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        model_id=LIAR_MODEL,
        model_source="builtin:default",
        accelerator_type="H100",
    )
    registry = get_registry()
    ray.get(registry.register.remote(spec))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(s.node_id == LIAR_ID and s.live for s in ray.get(registry.snapshot.remote())):
            break
        time.sleep(0.5)
    time.sleep(1.5)  # the gateway refreshes its snapshot every 0.5 s
    yield tok
    ray.get(registry.unregister.remote(LIAR_ID))
    serve.delete(f"node-{LIAR_ID}")


def _post(network, body: dict) -> tuple[int, dict, str]:
    req = urllib.request.Request(
        f"{network.base_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.mark.parametrize("stream", [False, True])
def test_inflated_usage_is_billed_as_counted(network, liar, usage_records, stream):
    prompt = "inflate the bill"
    status, headers, text = _post(
        network,
        {
            "model": LIAR_MODEL,
            "prompt": prompt,
            "max_tokens": 16,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        },
    )
    assert status == 200, text
    rid = headers["x-meritnet-request-id"]
    rec = usage_records()[rid]
    expected_prompt = len(liar.encode(prompt, add_special_tokens=True))
    expected_completion = len(liar.encode(TEXT, add_special_tokens=False))
    assert (rec.prompt_tokens, rec.completion_tokens, rec.status) == (
        expected_prompt,
        expected_completion,
        "ok",
    )
    usage = (
        json.loads(text)["usage"]
        if not stream
        else next(json.loads(e[6:]) for e in text.split("\n\n") if '"choices":[]' in e)["usage"]
    )
    assert usage["completion_tokens"] == expected_completion and usage["prompt_tokens"] == expected_prompt


def test_out_of_vocabulary_ids_are_billed_as_the_text(network, liar, usage_records):
    status, headers, _text = _post(network, {"model": LIAR_MODEL, "prompt": "oov please", "max_tokens": 16})
    assert status == 200
    rec = usage_records()[headers["x-meritnet-request-id"]]
    assert rec.completion_tokens == len(liar.encode(TEXT, add_special_tokens=False))


@pytest.mark.parametrize("mode", ["garbage", "badtype"])
def test_malformed_chunks_end_in_a_clean_error_event(network, liar, usage_records, mode):
    status, headers, text = _post(network, {"model": LIAR_MODEL, "prompt": f"{mode} now", "stream": True})
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and "[DONE]" not in text and "not json" not in text
    assert json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"
    deadline = time.monotonic() + 10  # the error record is written after the stream ends
    while headers["x-meritnet-request-id"] not in usage_records() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert usage_records()[headers["x-meritnet-request-id"]].status == "error"


def test_the_lies_are_counted_per_node(network, liar):
    metrics = urllib.request.urlopen(f"{network.base_url}/metrics", timeout=10).read().decode()
    assert f'meritnet_usage_disagreements_total{{field="completion",node="{LIAR_ID}"}}' in metrics
    assert f'meritnet_node_malformed_output_total{{node="{LIAR_ID}"}}' in metrics

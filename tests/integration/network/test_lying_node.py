"""A lying node on the real network (issues 10 and 11), managed (a Serve deployment) and open (an HTTP
server joined by signed registration): it inflates its usage, returns ids outside the vocabulary,
sends malformed chunks, stalls and answers with non-JSON. Clients get clean answers or clean OpenAI errors; the ledger
holds only what the gateway counted of what it really forwarded."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass

import pytest

from tests.support.liar_node import (
    LIAR_MODEL,
    TEXT,
    http_liar,
    liar_app,
    open_node,
    send_json,
    wait_live,
)

pytestmark = pytest.mark.integration


@dataclass
class Liar:
    node_id: str
    tok: object  # the trusted tokenizer


def _managed(ids: list[int]):
    import ray
    from ray import serve

    from cluster.records import NodeSpec
    from cluster.registry import get_registry

    node_id = "liar-1"
    serve.run(liar_app(node_id, ids), name=f"node-{node_id}", route_prefix=None)
    spec = NodeSpec(
        node_id=node_id,
        operator="0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        model_id=LIAR_MODEL,
        model_source="builtin:default",
        accelerator_type="H100",
    )
    ray.get(get_registry().register.remote(spec))
    yield node_id
    ray.get(get_registry().unregister.remote(node_id))
    serve.delete(f"node-{node_id}")


@pytest.fixture(scope="module", params=["managed", "open"])
def liar(network, request):
    from transformers import AutoTokenizer

    from deploy.network import resolve_model_source

    tok = AutoTokenizer.from_pretrained(resolve_model_source("builtin:default"))
    ids = tok.encode(TEXT, add_special_tokens=False)
    kind = (
        _managed(ids)
        if request.param == "managed"
        else open_node(network, http_liar(ids), LIAR_MODEL, "liar-2")
    )
    node_id = next(kind)
    wait_live(network, node_id)
    yield Liar(node_id, tok)
    next(kind, None)


def _post(network, body: dict) -> tuple[int, dict, str]:
    return send_json(f"{network.base_url}/v1/completions", body)


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
    expected_prompt = len(liar.tok.encode(prompt, add_special_tokens=True))
    expected_completion = len(liar.tok.encode(TEXT, add_special_tokens=False))
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


def test_out_of_vocabulary_ids_are_a_malformed_answer_and_nothing_is_billed(network, liar, usage_records):
    """Issue 28 (9): ids outside the model's vocabulary are refused as they arrive: the answer is the node's
    fault (the liar is the only node of its model: a clean 503), and no completed usage is recorded."""
    before = set(usage_records())
    status, _, text = _post(network, {"model": LIAR_MODEL, "prompt": "oov please", "max_tokens": 16})
    assert status == 503 and json.loads(text)["error"]["code"] == "upstream_failed", text
    new = [rec for r, rec in usage_records().items() if r not in before and rec.node_id == liar.node_id]
    assert all(rec.status != "ok" for rec in new), new


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
    assert f'meritnet_usage_disagreements_total{{field="completion",node="{liar.node_id}"}}' in metrics
    assert f'meritnet_node_malformed_output_total{{node="{liar.node_id}"}}' in metrics


def test_a_stalled_stream_ends_in_a_clean_error_and_a_record(network, liar, usage_records):
    status, headers, text = _post(network, {"model": LIAR_MODEL, "prompt": "stall now", "stream": True})
    assert status == 200 and "[DONE]" not in text
    assert json.loads([e for e in text.split("\n\n") if e][-1][6:])["error"]["code"] == "stream_interrupted"
    deadline = time.monotonic() + 10
    while headers["x-meritnet-request-id"] not in usage_records() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert usage_records()[headers["x-meritnet-request-id"]].status == "error"


def test_a_non_json_answer_is_a_clean_503_and_nothing_is_billed(network, liar, usage_records):
    before = {r for r, rec in usage_records().items() if rec.node_id == liar.node_id}
    status, _, text = _post(network, {"model": LIAR_MODEL, "prompt": "nonjson please", "max_tokens": 8})
    assert status == 503 and json.loads(text)["error"]["code"] == "upstream_failed", text
    assert not [
        r
        for r, rec in usage_records().items()
        if rec.node_id == liar.node_id and r not in before and rec.status == "ok"
    ]

"""A lying node for the integration tests, in both kinds a node can be:

- managed: a real Ray Serve deployment with the interface the gateway calls (`chat` / `completions`
  returning a stream of messages, like ray.serve.llm's LLMServer), registered in the real registry;
- open: a real HTTP server (uvicorn) speaking the open-node protocol (cluster/node_http.py), joined
  through the gateway's signed registration like any operator's node.

What it does is chosen by the prompt's first word:

    inflate  honest-looking text and ids, usage inflated a millionfold
    oov      token ids outside the vocabulary, text that does not match them
    garbage  one good chunk, then a chunk that is not JSON
    badtype  one good chunk, then a chunk whose text is a number and ids are negative
    stall    one good chunk, then silence (open node only: a managed node's stream is the same code)
    nonjson  a whole answer that is not JSON (open node only)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

from tests.support.ports import free_port
from tests.support.waiting import wait_until

LIAR_MODEL = "liar"
TEXT = "hello there"
HUGE = 10**6


def _chunk(text: str, ids: list[int], finish: str | None = None) -> str:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    return "data: " + json.dumps({"id": "x", "object": "text_completion", "choices": [choice]}) + "\n\n"


async def lies(prompt: str, stream: bool, model: str, ids_of_text: list[int]) -> AsyncIterator[list[str]]:
    """The liar's messages for one request (as text: every node sends text)."""
    mode = prompt.split(" ")[0]
    ids = [10**9, 10**9 + 1] if mode == "oov" else ids_of_text
    usage = {"prompt_tokens": HUGE, "completion_tokens": HUGE, "total_tokens": 2 * HUGE}
    if not stream:
        if mode == "nonjson":
            yield ["<html>this is not a completion</html>"]
            return
        choice = {"index": 0, "text": TEXT, "token_ids": ids, "finish_reason": "stop"}
        body = {"id": "x", "object": "text_completion", "model": model, "created": 0, "choices": [choice]}
        yield [json.dumps({**body, "usage": usage})]
        return
    yield [_chunk(TEXT[:5], ids[:1])]
    if mode == "garbage":
        yield ["data: {this is not json\n\n"]
        return
    if mode == "badtype":
        yield ['data: {"choices":[{"index":0,"text":7,"token_ids":[-3]}]}\n\n']
        return
    if mode == "stall":
        await asyncio.sleep(3600)
    yield [_chunk(TEXT[5:], ids[1:], "stop")]
    yield ["data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"]
    yield ["data: [DONE]\n\n"]


def liar_app(node_id: str, ids_of_text: list[int]):
    """The managed liar: a Serve deployment named like a node's."""
    from ray import serve

    @serve.deployment(name=f"node-{node_id}", ray_actor_options={"num_cpus": 0})
    class Liar:
        async def completions(self, body, raw=None):
            prompt = body.prompt if isinstance(body.prompt, str) else ""
            async for message in lies(prompt, bool(body.stream), body.model, ids_of_text):
                yield message if body.stream else message[0]

        async def chat(self, body, raw=None):
            raise NotImplementedError("the liar only lies on /v1/completions")
            yield  # an async generator, like LLMServer's

    return Liar.bind()


def http_liar(ids_of_text: list[int]):
    """The open liar: a Starlette app (serve it with uvicorn on 127.0.0.1). It answers the network's
    probes honestly and accepts any bearer: it is the network that must not trust it."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def health(_: Request):
        return JSONResponse({"status": "ok"})

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": LIAR_MODEL, "object": "model"}]})

    async def completions(request: Request):
        body = await request.json()
        prompt, stream = str(body.get("prompt", "")), bool(body.get("stream"))
        messages = lies(prompt, stream, body.get("model", ""), ids_of_text)
        if not stream:
            return Response((await anext(messages))[0], media_type="application/json")

        async def events():
            async for message in messages:
                for event in message:
                    yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


def http_embedder(model: str):
    """An open embeddings node (a Starlette app): one 8-float unit vector per input, in float or base64 as
    asked, and vLLM's usage shape; it lies by one vector too few when the first input starts with 'short'."""
    import base64
    import struct

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def health(_: Request):
        return JSONResponse({"status": "ok"})

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def embeddings(request: Request):
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = [[1.0 if j == len(str(t)) % 8 else 0.0 for j in range(8)] for t in inputs]
        if str(inputs[0]).startswith("short"):
            vectors = vectors[:-1]
        if body.get("encoding_format") == "base64":
            vectors = [base64.b64encode(struct.pack("<8f", *v)).decode() for v in vectors]
        data = [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": HUGE, "total_tokens": HUGE}
        return JSONResponse({"id": "embd", "object": "list", "model": model, "data": data, "usage": usage})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ]
    )


def wait_live(network, node_id: str) -> None:
    """Until the gateway itself lists `node_id` as live (its own view, GET /v1/nodes): it routes to it."""

    def listed_live() -> bool:
        with urllib.request.urlopen(f"{network.base_url}/v1/nodes", timeout=30) as r:
            return any(n["node_id"] == node_id and n["live"] for n in json.loads(r.read())["data"])

    wait_until(listed_live, timeout_s=120, interval_s=0.2)


def send_json(url: str, body: dict) -> tuple[int, dict, str]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def signed_registration(network, account, **fields) -> tuple[int, dict]:
    from cluster.registration import Registration, sign

    domain = json.loads(urllib.request.urlopen(f"{network.base_url}/v1/nodes/domain").read())
    reg = Registration(
        operator=account.address,
        chain_id=domain["chain_id"],
        network_id=domain["network_id"],
        nonce=time.time_ns(),
        expiry=int(time.time()) + 60,
        **fields,
    )
    return sign(reg, account).model_dump()


def open_node(network, app, model: str, node_id: str):
    """`app` (an HTTP node) served on 127.0.0.1 and joined as `node_id` serving `model` by a signed
    registration, like any operator's node; a generator: yields the node id, leaves and stops after."""
    import uvicorn
    from eth_account import Account

    port, account = free_port(), Account.create()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    join = signed_registration(
        network,
        account,
        action="join",
        node_id=node_id,
        model=model,
        accelerator="H100",
        endpoint=f"http://127.0.0.1:{port}",
    )
    status, _, text = send_json(f"{network.base_url}/v1/nodes", join)
    assert status == 201, text
    yield node_id
    status, _, text = send_json(
        f"{network.base_url}/v1/nodes/leave",
        signed_registration(network, account, action="leave", node_id=node_id),
    )
    assert status == 200, text
    server.should_exit = True
    thread.join(10)

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
from collections.abc import AsyncIterator

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

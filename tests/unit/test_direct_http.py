"""A managed node's direct HTTP face (cluster/node_http.py DirectServer) and the gateway's client for it
(cluster/nodes.py ManagedNode): a real uvicorn server on 127.0.0.1 in front of a stand-in for the node's
generation methods, no Ray. The integration suite runs the same path with real engines."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.node_http import DirectServer
from cluster.nodes import NodeDirectory
from tests.support.waiting import wait_until_async

MODEL = "default"


def _event(text: str, finish=None) -> str:
    choice = {"index": 0, "text": text, "token_ids": [5], "finish_reason": finish}
    return "data: " + json.dumps({"id": "x", "choices": [choice]}) + "\n\n"


class FakeEngine:
    """The node's generation methods as NodeServer has them: lists of SSE text, or one whole answer."""

    def __init__(self, chunks: int = 3, pause_s: float = 0.0) -> None:
        self.chunks, self.pause_s = chunks, pause_s
        self.started = 0
        self.closed = asyncio.Event()

    async def start(self, method: str, body):
        self.started += 1
        return self._run(body)

    async def _run(self, body):
        try:
            if not body.stream:
                yield json.dumps(
                    {"id": "x", "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}
                )
                return
            for i in range(self.chunks):
                yield [_event(f"t{i}")]
                await asyncio.sleep(self.pause_s)
            yield [_event("", "stop"), "data: [DONE]\n\n"]
        finally:
            self.closed.set()


def _request(stream: bool, model: str = MODEL) -> dict:
    return {"model": model, "prompt": "hello", "max_tokens": 4, "stream": stream}


@pytest.fixture
async def direct():
    engine = FakeEngine()
    server = await DirectServer.start("127.0.0.1", MODEL, engine.start)
    try:
        yield engine, server
    finally:
        await server.stop()


async def test_it_streams_the_nodes_events_and_answers_whole_with_the_secret(direct):
    _, server = direct
    auth = {"authorization": f"Bearer {server.link.secret}"}
    assert server.link.endpoint.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient(base_url=server.link.endpoint) as http:
        streamed = await http.post("/v1/completions", json=_request(True), headers=auth)
        whole = await http.post("/v1/completions", json=_request(False), headers=auth)
    assert streamed.status_code == 200
    events = [e for e in streamed.text.split("\n\n") if e]
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]] == ["t0", "t1", "t2", ""]
    assert events[-1] == "data: [DONE]"
    assert whole.status_code == 200 and whole.json()["choices"][0]["text"] == "hi"


@pytest.mark.parametrize(
    ("auth", "model", "status"),
    [(None, MODEL, 401), ("Bearer wrong", MODEL, 401), ("good", "other", 404), ("good", MODEL, 400)],
)
async def test_it_refuses_callers_without_the_secret_and_requests_it_cannot_serve(
    direct, auth, model, status
):
    engine, server = direct
    headers = {"authorization": f"Bearer {server.link.secret}" if auth == "good" else auth} if auth else {}
    payload = json.dumps(_request(True, model)) if status != 400 else "{not json"
    async with httpx.AsyncClient(base_url=server.link.endpoint) as http:
        answer = await http.post("/v1/completions", content=payload, headers=headers)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == status
    assert engine.started == 0  # nothing reached the engine


async def test_a_caller_that_leaves_mid_stream_stops_the_nodes_generation():
    engine = FakeEngine(chunks=1000, pause_s=0.01)
    server = await DirectServer.start("127.0.0.1", MODEL, engine.start)
    try:
        auth = {"authorization": f"Bearer {server.link.secret}"}
        async with httpx.AsyncClient(base_url=server.link.endpoint) as http:
            async with http.stream("POST", "/v1/completions", json=_request(True), headers=auth) as answer:
                async for _ in answer.aiter_raw():
                    break  # one read, then leave
        await asyncio.wait_for(engine.closed.wait(), 10)
    finally:
        await server.stop()


class FakeHandle:
    """A managed node's Serve handle: generation by handle, and `http_link` for the direct server."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.server, self.by_handle = engine, None, 0
        self.http_link = self

    def options(self, stream: bool = False) -> FakeHandle:
        return self

    @property
    def completions(self) -> FakeHandle:
        return self

    def remote(self, *args):
        if args:  # completions.remote(body, None): served by handle
            self.by_handle += 1
            return _Iter(["by-handle"])
        return self._link()  # http_link.remote()

    async def _link(self):
        if self.server is None:
            self.server = await DirectServer.start("127.0.0.1", MODEL, self.engine.start)
        return self.server.link


class _Iter:
    def __init__(self, items):
        self._items = iter(items)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        pass


async def _first(stream) -> str:
    first = await anext(stream)
    stream.cancel()
    return first if isinstance(first, str) else first[0]


async def test_the_gateway_moves_to_direct_http_and_back_to_the_handle_when_the_replica_is_gone():
    from ray.serve.llm.openai_api_models import CompletionRequest

    engine = FakeEngine()
    handle = FakeHandle(engine)
    directory = NodeDirectory(lambda node_id: handle)
    body = CompletionRequest.model_validate(_request(True))
    node = directory.client("n1")
    assert await _first(node.call("completions", body)) == "by-handle"  # no link yet: the handle serves
    for _ in range(100):  # the link is fetched in the background, then calls go over HTTP
        await asyncio.sleep(0.05)
        first = await _first(node.call("completions", body))
        if first != "by-handle":
            break
    assert json.loads(first[6:])["choices"][0]["text"] == "t0"
    assert engine.started == 1 and handle.by_handle >= 1

    await handle.server.stop()  # the replica is gone: its address refuses connections
    handle.server = None
    with pytest.raises(httpx.TransportError):
        await _first(node.call("completions", body))
    by_handle = handle.by_handle
    assert await _first(node.call("completions", body)) == "by-handle"  # the link was dropped
    assert handle.by_handle == by_handle + 1
    await wait_until_async(lambda: node._http is not None)  # a new link is fetched (the restarted replica's)
    assert json.loads((await _first(node.call("completions", body)))[6:])["choices"][0]["text"] == "t0"
    await handle.server.stop()

"""An open node's HTTP face: the operator's Serve app that the network's gateway calls.

`meritnet node serve` deploys the node's LLMServer (cluster/deployment.py, the same node as a managed
one) and, in front of it, this small ingress on the operator's Serve HTTP port:

    GET  /health                 200 while the ingress runs (the registry's liveness probe)
    GET  /v1/models              the model id it serves (the gateway's probe at join)
    POST /v1/chat/completions    OpenAI-compatible, streaming, token ids: only with the node's secret
    POST /v1/completions         same

The answer is the node's text as it comes (whole JSON, or `data: ...` events; an error in the middle
of a stream is sent as a `data:` event too). The secret is the one the network handed out at join
(`meritnet node join` writes it to `secret_file`, mode 0600); it is re-read when the file changes, so
a node can join, leave and re-join without a restart. Until it exists, generation answers 503.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import FastAPI, Request  # module level: FastAPI resolves the routes' annotations here

from cluster import sse
from cluster.local import HEAD_NODE
from cluster.records import NodeLink

INGRESS_NAME = "node-ingress"


class SecretFile:
    """The accepted secret, re-read when the file's mtime or size changes (a stat per request)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._secret: bytes | None = None

    def current(self) -> bytes | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._secret = None, None
            return None
        if (st.st_mtime_ns, st.st_size) != self._seen:
            self._secret = self.path.read_bytes().strip() or None
            self._seen = (st.st_mtime_ns, st.st_size)
        return self._secret

    def accepts(self, authorization: str) -> bool:
        secret = self.current()
        scheme, _, presented = authorization.partition(" ")
        return (
            secret is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(presented.strip().encode(), secret)
        )


def _error(status: int, message: str, type_: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status)


def _status_of(text: str) -> int:
    """The HTTP status of a whole answer: an engine error's code (4xx/5xx), else 200."""
    from cluster.completions import parse_body

    try:
        error = parse_body(text).error
    except ValueError:
        return 500
    if error is None:
        return 200
    return error.code if isinstance(error.code, int) and 400 <= error.code < 600 else 500


# The node routes, on an open node's ingress and on a managed node's replica alike.
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


def request_model(method: str):
    """vLLM's request model for a node route (generation as ray.serve.llm exports them); embeddings take
    OpenAI's shape only (`input`), not vLLM's chat-style variant."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

    return {
        "chat": ChatCompletionRequest,
        "completions": CompletionRequest,
        "embeddings": EmbeddingCompletionRequest,
    }[method]


async def answer(request: Request, method: str, model_id: str, accepts, start):
    """One generation call over HTTP: the secret (`accepts(authorization)`), vLLM's request model, then
    the node's text as it comes. `start(method, body)` starts the node's work and returns its messages
    (a Serve handle's stream, or the replica's own generator); a client that leaves stops that work."""
    from starlette.responses import Response, StreamingResponse

    if not accepts(request.headers.get("authorization", "")):
        return _error(401, "only the network this node joined may call it", "authentication_error")
    try:
        body = request_model(method).model_validate_json(await request.body())
    except ValueError as exc:
        return _error(400, f"invalid request: {exc.__class__.__name__}", "invalid_request_error")
    if body.model != model_id:
        return _error(404, f"this node serves {model_id!r}", "invalid_request_error")
    gen = await start(method, body)
    try:
        first = await anext(gen)
    except BaseException:
        await _stop(gen)
        raise
    text = first[0] if isinstance(first, list) else first
    if not getattr(body, "stream", False) or not sse.is_event(text):  # a whole answer, or an error up front
        await _stop(gen)
        return Response(text, status_code=_status_of(text), media_type="application/json")

    async def events():
        message = first
        try:
            while True:
                for piece in message if isinstance(message, list) else [message]:
                    yield piece if sse.is_event(piece) else sse.frame(piece)
                try:
                    message = await anext(gen)
                except StopAsyncIteration:
                    return
        finally:  # the end, or the caller left (the response is cancelled): stop the node's work
            await _stop(gen)

    return StreamingResponse(events(), media_type="text/event-stream")


async def _stop(gen) -> None:
    """End a node's generation: an async generator is closed, a Serve handle's stream cancelled."""
    close = getattr(gen, "aclose", None)
    if close is not None:
        await close()
    else:
        gen.cancel()


def node_ingress_app(model_id: str, node_app_name: str, secret_file: Path):
    """The ingress deployment, bound (place it with the node's app; it reaches the node by handle)."""
    from ray import serve
    from starlette.responses import Response

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    # On the head node: the secret file lives where `meritnet node serve` and `node join` run.
    @serve.deployment(
        name=INGRESS_NAME,
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0, "resources": HEAD_NODE},
    )
    @serve.ingress(app)
    class NodeIngress:
        def __init__(self) -> None:
            self._secret = SecretFile(secret_file)
            self._node = serve.get_deployment_handle(node_app_name, app_name=node_app_name).options(
                stream=True
            )

        @app.get("/health")
        async def health(self):
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(self):
            return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "operator"}]}

        async def _start(self, method: str, body):
            return getattr(self._node, method).remote(body, None)

        async def _generate(self, request: Request, method: str) -> Response:
            if self._secret.current() is None:
                return _error(
                    503, "this node has not joined a network yet (meritnet node join)", "unavailable"
                )
            return await answer(request, method, model_id, self._secret.accepts, self._start)

        @app.post(PATHS["chat"])
        async def chat(self, request: Request):
            return await self._generate(request, "chat")

        @app.post(PATHS["completions"])
        async def completions(self, request: Request):
            return await self._generate(request, "completions")

        @app.post(PATHS["embeddings"])
        async def embeddings(self, request: Request):
            return await self._generate(request, "embeddings")

    return NodeIngress.bind()


class DirectServer:
    """A managed node's own HTTP face, inside its replica (cluster/deployment.py NodeServer): the gateway
    streams the node's text straight from the process that runs the engine, with no Ray object and no
    Serve bookkeeping per message. It serves the node routes (PATHS) only, on `host` and a free port,
    behind a secret made here and handed out only through the node's Serve handle (inside the network's
    token-authenticated Ray cluster): `link` is what the gateway needs."""

    def __init__(self, link, server, task) -> None:
        self.link, self._server, self._task = link, server, task

    @classmethod
    async def start(cls, host: str, model_id: str, start) -> DirectServer:
        """Serve `start(method, body)` (the node's methods) on `host`; returns once bound."""
        import asyncio
        import contextlib
        import secrets
        import socket

        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        request_model("chat")  # imported now, not on the first request's path
        secret = secrets.token_urlsafe(32).encode()

        def accepts(authorization: str) -> bool:
            scheme, _, presented = authorization.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), secret)

        def route(method: str) -> Route:
            async def endpoint(request: Request):
                return await answer(request, method, model_id, accepts, start)

            return Route(PATHS[method], endpoint, methods=["POST"])

        app = Starlette(routes=[route(m) for m in PATHS])
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        # The gateway's pool closes idle connections after 5 s (httpx's default): the server keeps them
        # longer, so it is never the side that closes a connection just as a request goes out on it.
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, timeout_keep_alive=75, http="httptools"
        )
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # the replica's signals stay Ray's
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return cls(NodeLink(endpoint=f"http://{netloc}", secret=secret.decode()), server, task)

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task

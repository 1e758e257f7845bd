"""One interface to a node, whichever kind it is: the gateway does not care how it reaches one.

`NodeClient.call(method, body)` starts a completion and returns a `NodeStream`: an async iterator of
what the node sent, as text (a whole JSON answer, or `data: ...` stream events, one or a list per
message), with `cancel()` to stop the node's work. The gateway parses that text strictly
(cluster/completions.py) and bounds how long it waits for each message, for both kinds alike.

- `ManagedNode`: a *managed* node, a Serve deployment in the network's own Ray cluster: over HTTP
  straight to its replica (cluster/node_http.py DirectServer) once the replica handed out its link,
  through its Serve handle (`ServeNode`) until then or when it has several replicas.
- `HttpNode`: an *open* node, an operator's Serve app reached over HTTP (cluster/node_http.py on the
  other side) through one keep-alive pool per gateway, presenting the node's secret. Everything it
  reads is bounded: an event larger than `MAX_EVENT_BYTES`, a whole answer larger than
  `MAX_BODY_BYTES`, or all of one request's answer beyond what its max_tokens x n allows
  (cluster/completions.answer_byte_cap) ends the call with a ValueError (a malformed answer, the
  node's fault).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from cluster.completions import answer_byte_cap
from cluster.node_http import PATHS
from cluster.pinned_http import pinned_client, pinned_request
from cluster.probe import read_capped
from cluster.records import NodeLink
from cluster.registration import HOP_HEADER
from cluster.sse import EventSplitter

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 8 << 20  # one stream event: a chunk's text and ids are far smaller
MAX_BODY_BYTES = 64 << 20  # one whole answer (n choices of up to max_tokens each, with ids)


class NodeStream(Protocol):
    def __aiter__(self) -> NodeStream: ...

    async def __anext__(self) -> str | list[str]: ...

    def cancel(self) -> None: ...


class NodeClient(Protocol):
    # Whether the node's 4xx verdict on a request is taken as the request's fault (passed to the client).
    # An open node's is not: it could refuse valid requests at no cost, so the gateway tries another node.
    vouched: bool

    def call(self, method: str, body: Any) -> NodeStream:
        """Start `method` ('chat' or 'completions') with a validated vLLM request model."""
        ...


class ServeNode:
    """A managed node through its Serve handle (ray.serve.llm's LLMServer, cluster/deployment.py)."""

    vouched = True

    def __init__(self, handle) -> None:
        self._handle = handle.options(stream=True)

    def call(self, method: str, body: Any) -> NodeStream:
        return getattr(self._handle, method).remote(body, None)


# Statuses that say nothing about the client's request, only about the node (its secret, its routes,
# its load): the gateway tries another node instead of passing them on. Other 4xx are vLLM's own
# verdict on the request (e.g. a prompt longer than the context) and reach the client as they are.
_NODE_FAULTS = {401, 403, 404, 405, 407, 408, 429}


class NodeRefused(ConnectionError):
    """An open node refused the call for a reason of its own (a node failure, not the client's)."""


class HttpNode:
    """An open node over HTTP. `client` is the gateway's shared httpx.AsyncClient (its pool)."""

    vouched = False

    def __init__(self, link: NodeLink, client) -> None:
        self.link = link
        self._client = client

    def call(self, method: str, body: Any) -> NodeStream:
        return _HttpStream(self, method, body)

    def lost(self) -> None:
        """A call could not reach the node (connect, send or refusal before an answer)."""


class ManagedNode(ServeNode):
    """A managed node, over HTTP straight to its replica (the link its `http_link` method hands out,
    cluster/deployment.py) once known, else through its Serve handle: the link is fetched in the
    background, and dropped when a call cannot reach it (a restarted replica has a new one)."""

    RETRY_S = 5.0  # after a failed or refused link fetch

    def __init__(self, handle, client: Callable[[], Any]) -> None:
        super().__init__(handle)
        self._plain = handle
        self._client_for = client
        self._http: HttpNode | None = None
        self._fetch: asyncio.Task | None = None
        self._next_fetch = 0.0

    def call(self, method: str, body: Any) -> NodeStream:
        if self._http is not None:
            return _HttpStream(self._http, method, body)
        loop = asyncio.get_running_loop()
        if self._fetch is None and loop.time() >= self._next_fetch:
            self._fetch = loop.create_task(self._fetch_link())
        return super().call(method, body)

    async def _fetch_link(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            link = await asyncio.wait_for(self._plain.http_link.remote(), 30)
            if link is not None:
                self._http = _ManagedHttp(self, link, self._client_for())
            else:  # direct HTTP off for this node: ask again much later (a redeploy may turn it on)
                self._next_fetch = loop.time() + 60 * self.RETRY_S
        except Exception as exc:  # noqa: BLE001 - the handle keeps serving; try again later
            log.info("no HTTP link from a managed node yet (%s)", type(exc).__name__)
            self._next_fetch = loop.time() + self.RETRY_S
        finally:
            self._fetch = None

    def lost(self) -> None:
        self._http = None


class _ManagedHttp(HttpNode):
    vouched = True  # the runner's own node: its 4xx verdict on a request is vLLM's, passed to the client

    def __init__(self, owner: ManagedNode, link: NodeLink, client) -> None:
        super().__init__(link, client)
        self._owner = owner

    def lost(self) -> None:
        self._owner.lost()


class _HttpStream:
    """One HTTP call as a NodeStream. Non-streamed: one message, the body. Streamed: each network read's
    complete events as one message (events already here travel together, like a managed node's
    coalesced chunks). A non-200 answer is one message with its body (the node's error JSON)."""

    def __init__(self, node: HttpNode, method: str, body: Any) -> None:
        self._node, self._method, self._body = node, method, body
        self._response = None
        self._chunks = None
        self._events = EventSplitter(MAX_EVENT_BYTES)
        self._cap = answer_byte_cap(body)  # all the node may send for this request
        self._received = 0
        self._done = False
        self._cancelled = False

    def __aiter__(self) -> _HttpStream:
        return self

    async def _open(self) -> None:
        client = self._node._client
        link = self._node.link
        request = pinned_request(
            client,
            "POST",
            link.endpoint,
            PATHS[self._method],
            link.tls_name,
            content=self._body.model_dump_json(exclude_unset=True, by_alias=True),  # wire names: "schema"
            # identity: what a node sends is read as it comes, never inflated by a decompressor
            headers={
                "authorization": f"Bearer {link.secret}",
                "content-type": "application/json",
                "accept-encoding": "identity",
                HOP_HEADER: "1",  # a gateway posing as a node refuses it: no relaying loops (issue 28)
            },
        )
        try:
            self._response = await client.send(request, stream=True)
        except Exception:
            self._node.lost()
            raise
        self._chunks = self._response.aiter_raw()

    async def _read_all(self) -> str:
        return (await read_capped(self._chunks, min(MAX_BODY_BYTES, self._cap))).decode()

    async def __anext__(self) -> str | list[str]:
        if self._done or self._cancelled:
            raise StopAsyncIteration
        try:
            if self._response is None:
                await self._open()
                status = self._response.status_code
                if status in _NODE_FAULTS:
                    self._node.lost()
                    raise NodeRefused(f"the node answered {status}")
                if status != 200 or not getattr(self._body, "stream", False):
                    self._done = True
                    return await self._read_all()
            while True:
                piece = await anext(self._chunks, None)
                if piece is None:
                    self._done = True
                    self._events.close()
                    raise StopAsyncIteration
                self._received += len(piece)
                if self._received > self._cap:
                    raise ValueError(f"an answer larger than the request allows ({self._cap} bytes)")
                events = self._events.feed(piece)
                if events:
                    return events
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Close the connection: the node sees the client leave and stops the generation."""
        if self._cancelled:
            return
        self._cancelled = True
        if self._response is not None:
            asyncio.get_running_loop().create_task(self._response.aclose())


class _Gone:
    """An open node with no link (it left): every call fails before the first byte."""

    vouched = False

    def call(self, method: str, body: Any) -> NodeStream:
        return self

    def __aiter__(self) -> _Gone:
        return self

    async def __anext__(self) -> str | list[str]:
        raise NodeRefused("the node has left the network")

    def cancel(self) -> None:
        pass


class NodeDirectory:
    """node id -> NodeClient for the gateway: managed nodes through Serve handles (made on first use),
    open nodes over HTTP from the registry's links (refreshed in the background)."""

    def __init__(self, handle_for: Callable[[str], Any], http_client=None) -> None:
        self._handle_for = handle_for
        self._http = http_client
        self._managed: dict[str, ServeNode] = {}
        self._open: dict[str, HttpNode] = {}

    def _client(self):
        """One pool for every node reached over HTTP: keep-alive connections, no total timeout (the
        gateway bounds the wait for each message itself); connecting is bounded here. Made on first
        need (a network with no open node and no direct HTTP has none)."""
        if self._http is None:
            import httpx

            # httpx logs every request at INFO: one line per completion in the gateway's log, for nothing
            logging.getLogger("httpx").setLevel(logging.WARNING)

            self._http = pinned_client(
                timeout=httpx.Timeout(None, connect=5.0),
                limits=httpx.Limits(max_connections=4096, max_keepalive_connections=256),
            )
        return self._http

    def set_links(self, links: dict[str, NodeLink]) -> None:
        """The open nodes' current endpoints and secrets (a node that re-joined gets a new client)."""
        self._open = {
            n: self._open[n]
            if n in self._open and self._open[n].link == link
            else HttpNode(link, self._client())
            for n, link in links.items()
        }

    def client(self, node_id: str, open_node: bool = False) -> NodeClient:
        """The node's client; `open_node` for a node the snapshot lists as open (one that left between the
        snapshot and the links fails like an unreachable node, never falls back to a Serve handle)."""
        node = self._open.get(node_id)
        if node is not None:
            return node
        if open_node:
            return _Gone()
        if node_id not in self._managed:
            self._managed[node_id] = ManagedNode(self._handle_for(node_id), self._client)
        return self._managed[node_id]

"""One bounded HTTP GET for probing an open node that may lie, at its pinned endpoint
(cluster/pinned_http.py): the registry's liveness probe and the gateway's join probe. Bounded in time as
a whole (not per read: a node dripping a byte a second must not hold a probe open) and in size (a node
cannot make the prober hold more than `max_bytes`)."""

from __future__ import annotations

import asyncio

from cluster.pinned_http import pinned_request


class ProbeFailed(Exception):
    """The endpoint did not answer in time, within the size bound, or at all."""


async def read_capped(pieces, max_bytes: int) -> bytes:
    """All of an async iterator of bytes (an httpx response's `aiter_raw()`), or ValueError as soon as
    it passes `max_bytes`: what a node sends is never held beyond the bound."""
    data = bytearray()
    async for piece in pieces:
        data += piece
        if len(data) > max_bytes:
            raise ValueError(f"answered more than {max_bytes} bytes")
    return bytes(data)


async def get_bounded(
    client, endpoint: str, path: str, max_bytes: int, timeout_s: float, tls_name: str | None = None
) -> tuple[int, bytes]:
    """(status, body) of GET `path` on the open node's pinned `endpoint` (with its `tls_name`, if any:
    cluster/pinned_http.py) through the httpx.AsyncClient `client`; ProbeFailed otherwise."""
    import httpx

    async def fetch() -> tuple[int, bytes]:
        request = pinned_request(client, "GET", endpoint, path, tls_name)
        answer = await client.send(request, stream=True)
        try:
            return answer.status_code, await read_capped(answer.aiter_raw(), max_bytes)
        finally:
            await answer.aclose()

    try:
        return await asyncio.wait_for(fetch(), timeout_s)
    except ValueError as exc:
        raise ProbeFailed(str(exc)) from None
    except TimeoutError:
        raise ProbeFailed(f"no whole answer within {timeout_s:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ProbeFailed(type(exc).__name__) from None

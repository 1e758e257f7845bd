"""Server-sent events as OpenAI streams use them: each event is `data: <JSON>` and a blank line, and
`data: [DONE]` ends the stream. The one framer and the one incremental splitter of every component that
writes a stream (a node's HTTP server, the gateway) or reads one from an untrusted peer (the gateway
from an open node, a validator from the gateway)."""

from __future__ import annotations

PREFIX = "data: "
DONE = "data: [DONE]\n\n"
_END = b"\n\n"


def frame(payload: str) -> str:
    """One event carrying `payload` (JSON text)."""
    return f"{PREFIX}{payload}\n\n"


def is_event(text: str) -> bool:
    """`data: ...` (an event) rather than a whole JSON body."""
    return text.startswith(PREFIX)


def is_done(event: str) -> bool:
    return event.startswith(DONE.rstrip())


def payload(event: str) -> str:
    """The text after `data: `, without the blank line that ends the event."""
    return event[len(PREFIX) :].rstrip("\n")


class EventSplitter:
    """Complete events out of bytes as they arrive from the network, each `data: ...\\n\\n`. Only bytes not
    searched before are searched (plus one, for a separator split across reads), so a peer sending a
    large event in tiny pieces costs linear, not quadratic, time; an event over `max_event_bytes` raises."""

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for an event end

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        end = self._buffer.rfind(_END, max(0, self._scanned - 1))
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self.max_event_bytes:
                raise ValueError(f"a stream event larger than {self.max_event_bytes} bytes")
            return []
        head = bytes(self._buffer[: end + 2])
        del self._buffer[: end + 2]
        self._scanned = 0
        return [e.decode() + "\n\n" for e in head.split(_END) if e.strip()]

    def close(self) -> None:
        """The stream ended: anything left is an event cut short."""
        if self._buffer.strip():
            raise ValueError("the stream ended inside an event")

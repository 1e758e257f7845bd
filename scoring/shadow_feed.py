"""The shadow feed: organic completions offered for shadow verification (run as a Ray actor by deploy).

The gateway offers it a keyed-hash sample of completed, verifiable organic requests (`shadow_rate`,
default 2%); every validator reads the feed and verifies what falls in its own sample, exactly like a
challenge answer (`scoring.Validator.follow_shadow_feed`). The feed is an in-memory ring: organic
prompts and outputs are never written to disk or logs.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any


class ShadowFeed:
    """A bounded ring of organic completions offered for shadow verification (a Ray actor).

    Items are numbered; each reader keeps its own cursor (`since`), so every validator sees every item
    that is still in the ring. When readers fall behind by more than `capacity` items the oldest are
    dropped (counted): verification is a sample, it must never hold up serving."""

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._ring: deque = deque(maxlen=capacity)
        self._next = 0  # sequence number of the next item offered
        self.dropped = 0

    def offer(self, items: Sequence[Any]) -> None:
        for item in items:
            if len(self._ring) == self._ring.maxlen:
                self.dropped += 1
            self._ring.append((self._next, item))
            self._next += 1

    def since(self, cursor: int, limit: int = 32) -> tuple[list[Any], int]:
        """Items numbered >= cursor (at most `limit`), and the cursor to ask with next."""
        oldest = self._next - len(self._ring)
        start = max(cursor, oldest)
        items = [item for _, item in itertools.islice(self._ring, start - oldest, start - oldest + limit)]
        return items, start + len(items)

    def stats(self) -> dict[str, int]:
        return {"offered": self._next, "held": len(self._ring), "dropped": self.dropped}

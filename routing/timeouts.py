"""How long a node may take for one request (the gateway's and the network config's `timeouts`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Timeouts(BaseModel):
    """How long a node may take for one request. A node past any of these counts as failed: before its
    first byte the request moves to another node; mid-stream the client gets a clean error event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_byte_s: float = Field(
        default=120.0,
        gt=0,
        description="A streamed request's node that sends nothing for this long has failed.",
    )
    stream_idle_s: float = Field(
        default=60.0, gt=0, description="A node silent this long in the middle of a stream is cut off."
    )
    total_base_s: float = Field(
        default=30.0, gt=0, description="Time every request gets on top of its per-token allowance."
    )
    total_per_token_s: float = Field(
        default=0.5, gt=0, description="Time allowed per requested token (max_tokens x n)."
    )
    total_max_s: float = Field(
        default=1800.0,
        gt=0,
        description="Cap of one request's total time; the limit of one without max_tokens.",
    )

    def total_s(self, max_tokens: int | None, n: int = 1) -> float:
        """The whole time one request may take (504, or an error event mid-stream, past it): a base
        plus an allowance per requested token, capped; unbounded tokens get the cap."""
        if max_tokens is None:
            return self.total_max_s
        return min(self.total_max_s, self.total_base_s + self.total_per_token_s * max_tokens * n)

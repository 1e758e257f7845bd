"""What a node returns for a completion, parsed strictly: the one parser of node output.

The gateway (metering, shadow capture) and the validators read a node's answers through these
models and nothing else, so a node cannot show validators one thing and the gateway another. Only
the fields the network reads are declared (others are ignored); each is strictly typed and bounded:
a string is a string, ids are non-negative ints (never bools or numeric strings), counts and list
lengths have ceilings far above any real context. Anything else raises `pydantic.ValidationError`.

A body is a whole (non-streamed) chat or completions response, or one streamed chunk (`data: {...}`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

MAX_TOOL_CALLS = 128  # tool calls in one message or delta
MAX_IDS = 1 << 20  # token ids one answer may carry: far above any context; bounds what a node makes us hold
MAX_COUNT = (
    1 << 24
)  # a token count one record may carry (UsageRecord's bound too): sums of them cannot overflow
MAX_CHOICES = 1024  # choices per body (the gateway bounds n far lower)
MAX_TOKEN_ID = (
    1 << 31
) - 1  # int32, what engines index vocabularies with; the vocabulary bound is the gateway's

# What one request's answer may weigh, in bytes, all events or the whole body together. A streamed token
# is ~300 bytes of JSON (its event's envelope, text and id), ~2 KiB with 20 top logprobs; 8 KiB per
# token is generous. The base covers envelopes, usage and errors; the ceiling applies when the request
# does not bound its tokens (no max_tokens) or asks its prompt back (echo, prompt_logprobs).
ANSWER_BASE_BYTES = 1 << 20
ANSWER_BYTES_PER_TOKEN = 8 << 10
MAX_ANSWER_BYTES = 256 << 20

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class NodeFunction(_Strict):
    name: str | None = None
    arguments: str | None = None  # JSON text, whole or (streamed) a fragment


class NodeToolCall(_Strict):
    index: int | None = Field(default=None, ge=0, lt=MAX_TOOL_CALLS)  # a streamed delta's call
    function: NodeFunction | None = None


class NodeMessage(_Strict):
    content: str | None = None
    tool_calls: list[NodeToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)


class NodeChoice(_Strict):
    """One choice (or stream delta) of a node's answer."""

    index: int = Field(default=0, ge=0, le=MAX_CHOICES)
    text: str | None = None
    message: NodeMessage | None = None
    delta: NodeMessage | None = None
    token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_IDS)
    finish_reason: str | None = Field(default=None, max_length=64)

    @property
    def content(self) -> str:
        """The text the client gets in this choice or delta ('' when there is none): its content, and
        the function names and arguments of its tool calls (generated text too, billed like it)."""
        if self.text is not None:
            return self.text
        msg = self.message or self.delta
        if msg is None:
            return ""
        calls = "".join(
            (c.function.name or "") + (c.function.arguments or "") for c in msg.tool_calls or () if c.function
        )
        return (msg.content or "") + calls


class NodeUsage(_Strict):
    """The usage a node reports about itself: compared with the gateway's own count, never paid."""

    prompt_tokens: Count = 0
    completion_tokens: Count = 0


class NodeError(_Strict):
    """An error a node (vLLM's ErrorResponse) or the gateway reports instead of a completion."""

    message: str = Field(default="", max_length=4096)
    type: str | None = Field(default=None, max_length=128)
    code: int | str | None = None


class NodeBody(_Strict):
    """A node's whole response, or one stream chunk, as far as the network reads it."""

    choices: list[NodeChoice] = Field(default_factory=list, max_length=MAX_CHOICES)
    usage: NodeUsage | None = None
    error: NodeError | None = None


def as_text(message: Any) -> str:
    """What a node sends for one message: JSON text (a stream chunk already is; a whole response or
    an ErrorResponse is dumped). The gateway reads nothing but text from a node."""
    return message if isinstance(message, str) else message.model_dump_json()


def parse_body(raw: str | bytes | dict[str, Any] | Any) -> NodeBody:
    """Parse one body: JSON text (a stream chunk without its `data: ` prefix, or a whole response) or
    already-decoded JSON. Raises `pydantic.ValidationError` for anything malformed."""
    if isinstance(raw, str | bytes):
        return NodeBody.model_validate_json(raw)
    return NodeBody.model_validate(raw)


def answer_byte_cap(body: Any) -> int:
    """The most bytes an honest node sends for the request `body` (a validated vLLM request): derived
    from its completion tokens (max_tokens x n x prompts) at `ANSWER_BYTES_PER_TOKEN`, at most
    `MAX_ANSWER_BYTES`. More is a malformed answer, whatever each event or body weighs."""
    per_choice = _int(body, "max_completion_tokens") or _int(body, "max_tokens")
    if per_choice is None or getattr(body, "echo", False) or getattr(body, "prompt_logprobs", None):
        return MAX_ANSWER_BYTES
    prompt = getattr(body, "prompt", None)
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    tokens = per_choice * max(1, _int(body, "n") or 1) * max(1, prompts)
    return min(MAX_ANSWER_BYTES, ANSWER_BASE_BYTES + ANSWER_BYTES_PER_TOKEN * tokens)


def _int(body: Any, name: str) -> int | None:
    value = getattr(body, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

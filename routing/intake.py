"""Request intake: a client's bytes become a validated request, or an OpenAI-shaped 4xx. Never a 5xx.

In order: JSON content type (415: a web page cannot post a form to a local gateway), body size (413,
read with a cap, never buffered past it), strict UTF-8, JSON without NaN/Infinity or duplicate keys,
nesting depth and lone surrogates (one walk over the parsed value), then vLLM's protocol models, then
the network's own caps (`n`, `max_tokens`, known content-part types), all before any node is called.
A client's bad request is therefore never sent to a node, and never counted against one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.embeddings import MAX_INPUTS
from routing import errors

# Content parts vLLM's chat models understand; anything else is the client's mistake, not a node's.
CONTENT_PART_TYPES = frozenset(
    {
        "text",
        "image_url",
        "input_audio",
        "audio_url",
        "video_url",
        "file",
        "refusal",
        "image_embeds",
        "image_pil",
        "input_image",
        "input_text",
        "output_text",
    }
)


class IntakeLimits(BaseModel):
    """What one request may ask of the network (checked before a node is called)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(default=4 << 20, ge=1024, description="Largest request body (413 above).")
    max_json_depth: int = Field(default=32, ge=4, le=256, description="Deepest nesting of arrays/objects.")
    max_n: int = Field(default=16, ge=1, le=1024, description="Largest `n` (choices per request).")
    max_tokens: int = Field(default=32768, ge=1, description="Largest max_tokens / max_completion_tokens.")
    max_inputs: int = Field(
        default=MAX_INPUTS, ge=1, le=MAX_INPUTS, description="Most inputs of one embeddings request."
    )


def chat_messages(body: Any) -> list | None:
    """The messages of a chat request; None for a completions request, even one that carries an extra
    `messages` field (vLLM's models keep unknown fields: never decide the kind by attribute)."""
    return body.messages if "messages" in type(body).model_fields else None


def is_embedding(body: Any) -> bool:
    """Whether `body` is an embeddings request (its texts are `input`), by its model, not its fields."""
    return "input" in type(body).model_fields


def prompts(body: Any) -> list:
    """The prompts of a completions request or the inputs of an embeddings request, one item each (a
    text or a list of token ids)."""
    raw = body.input if is_embedding(body) else body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        return [raw]
    return list(raw or ())


def int_field(body: Any, name: str) -> int | None:
    """An integer parameter of a validated request, or None. vLLM's models keep unknown fields (a
    completions body may carry `max_completion_tokens: []`), so a field is used only if it is an int."""
    value = getattr(body, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def max_tokens(body: Any) -> int | None:
    """The most tokens the request lets each choice generate (max_completion_tokens, else max_tokens);
    None when it set neither."""
    return int_field(body, "max_completion_tokens") or int_field(body, "max_tokens")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return obj


_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def _too_deep(raw: bytes, max_depth: int) -> bool:
    """Whether the JSON text nests deeper than `max_depth`, found without parsing it: json's parser
    recurses, and a deep enough body would exhaust the stack whatever the recursion limit is."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False  # the common case: cannot be deeper than its number of openings
    depth, in_string, escaped_at = 0, False, -1
    for m in _STRUCTURE.finditer(raw):
        c, at = m.group(), m.start()
        if in_string:
            if at == escaped_at:
                continue
            if c == b"\\":
                escaped_at = at + 1
            elif c == b'"':
                in_string = False
        elif c == b'"':
            in_string = True
        elif c in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates in any key or string, iteratively (depth was bounded before parsing)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise errors.APIError(
                    400,
                    "The request contains a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode.",
                    code="invalid_unicode",
                ) from None
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


async def read_json(request: Request, limits: IntakeLimits) -> dict:
    """The request's JSON object, or an APIError (413, 415 or 400)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise errors.APIError(
            415,
            f"Send the body as JSON with 'Content-Type: application/json' (got {ctype or 'none'!r}).",
            code="unsupported_media_type",
        )
    too_big = errors.APIError(
        413, f"The request body exceeds {limits.max_body_bytes} bytes.", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    request.state.body_sha256 = hashlib.sha256(raw).hexdigest()  # the usage leaf's requestHash
    if _too_deep(raw, limits.max_json_depth):
        raise errors.APIError(
            400, f"The request body nests deeper than {limits.max_json_depth} levels.", code="too_deep"
        )
    try:
        text = raw.decode("utf-8")
        payload = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError:
        raise errors.malformed_json("it is not valid UTF-8") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError, as are the hooks' refusals
        raise errors.malformed_json(str(exc)) from None
    if not isinstance(payload, dict):
        raise errors.malformed_json("expected a JSON object at the top level")
    _check_strings(payload)
    return payload


# Integer parameters (in either request kind) that JSON true/false must not stand for: vLLM's models are
# lax and read `max_tokens: true` as 1, while the gateway's own bounds (routing/metering.py) skip a bool.
INT_PARAMS = (
    "n",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "seed",
    "top_k",
    "top_logprobs",
    "best_of",
    "truncate_prompt_tokens",
)


def validate(payload: dict, request_cls: type[BaseModel], limits: IntakeLimits) -> BaseModel:
    """vLLM's protocol model of the request, then the network's caps; any refusal is a 400."""
    for name in INT_PARAMS:
        if isinstance(payload.get(name), bool):
            raise errors.APIError(
                400, f"'{name}' must be an integer, not {str(payload[name]).lower()}.", param=name,
                code="invalid_type",
            )  # fmt: skip
    try:
        body = request_cls.model_validate(payload)
    except ValidationError as exc:
        raise errors.from_validation_error(exc) from None
    except Exception as exc:  # noqa: BLE001 - vLLM's validators raise their own types: all are the client's
        param = getattr(exc, "parameter", None)
        raise errors.APIError(400, f"Invalid request: {exc}", param=param, code="invalid_value") from None
    if not getattr(body, "model", None):
        raise errors.APIError(
            400, "'model' is required: name one of GET /v1/models.", param="model", code="invalid_value"
        )
    n = int_field(body, "n") or 1
    if not 1 <= n <= limits.max_n:
        raise errors.APIError(
            400, f"'n' is {n}; this network allows at most {limits.max_n}.", param="n", code="invalid_value"
        )
    for name in ("max_tokens", "max_completion_tokens"):
        value = int_field(body, name)
        if value is not None and not 1 <= value <= limits.max_tokens:
            raise errors.APIError(
                400,
                f"'{name}' is {value}; it must be between 1 and {limits.max_tokens}.",
                param=name,
                code="invalid_value",
            )
    if is_embedding(body):
        _check_embedding(body, limits)
    # content parts are checked on the payload: the validated model holds them as one-shot iterators
    raw_messages = payload.get("messages") if chat_messages(body) is not None else None
    for i, message in enumerate(raw_messages if isinstance(raw_messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in CONTENT_PART_TYPES:
                raise errors.APIError(
                    400,
                    f"messages[{i}].content has a part of unknown type {kind!r}; use one of "
                    f"{', '.join(sorted(CONTENT_PART_TYPES))}.",
                    param=f"messages.{i}.content",
                    code="invalid_value",
                )
    return body


# What an embeddings answer may be in: vectors as JSON floats or base64 of little-endian float32s (the
# binary encodings, other dtypes and big-endian answers are vLLM extensions that no OpenAI client reads).
EMBEDDING_ENCODINGS = ("float", "base64")


def _check_embedding(body: Any, limits: IntakeLimits) -> None:
    """An embeddings request's own caps: 1..max_inputs non-empty inputs, an OpenAI encoding."""
    items = prompts(body)
    if not 1 <= len(items) <= limits.max_inputs or any(len(item) == 0 for item in items):
        raise errors.APIError(
            400,
            f"'input' must be a non-empty text or token list, or 1 to {limits.max_inputs} of them, none empty.",
            param="input",
            code="invalid_value",
        )
    if body.encoding_format not in EMBEDDING_ENCODINGS or body.embed_dtype != "float32":
        raise errors.APIError(
            400,
            f"'encoding_format' must be one of {', '.join(EMBEDDING_ENCODINGS)} (float32 vectors).",
            param="encoding_format",
            code="invalid_value",
        )
    if body.endianness == "big":
        raise errors.APIError(
            400, "'endianness' big is not served; base64 vectors are little-endian.", param="endianness"
        )

"""A request's structured-output constraint as vLLM compiles it: one mapping for the gateway (which
answers it offers validators) and the validators (which grammar they replay, `scoring.grammar`)."""

from __future__ import annotations

import json
from typing import Any

# vLLM maps response_format json_object to this schema (v1/structured_output/backend_xgrammar.py).
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def schema_text(response_format: Any) -> str | None:
    """The JSON schema text vLLM compiles for a request's `response_format` (a vLLM protocol model or a
    dict): json_object's fixed schema, json_schema's `schema` dumped as vLLM dumps it, None for 'text'
    or nothing. Raises ValueError for any other kind (a structural tag, which is not replayed)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        response_format = response_format.model_dump(by_alias=True)
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is None:
            raise ValueError("json_schema response_format without a schema")
        return schema if isinstance(schema, str) else json.dumps(schema)
    raise ValueError(f"response_format {kind!r} is not replayed")

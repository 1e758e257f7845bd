"""A request's structured-output constraint as vLLM compiles it: one mapping for the gateway (which
answers it offers validators) and the validators (which grammar they replay, `scoring.grammar`)."""

from __future__ import annotations

import copy
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


def tool_mode(body: Any) -> tuple[str, str | None] | None:
    """('named', function) or ('required', None) for a request whose tool call vLLM constrains to a
    schema; None for no tools, or tool_choice 'auto'/'none' (free text, parsed after the fact)."""
    choice = getattr(body, "tool_choice", None)
    if not getattr(body, "tools", None) or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return "required", None
    function = getattr(choice, "function", None)
    if function is None:
        raise ValueError(f"tool_choice {choice!r} is not replayed")
    return "named", function.name


def constraint_schema(body: Any) -> str | None:
    """The JSON schema a (vLLM protocol) request's answer is decoded under, as vLLM builds it: a named or
    required tool call's (vllm.tool_parsers.utils.get_json_schema_from_tools; it overrides
    response_format), else the response_format's (`schema_text`). Raises ValueError for constraints
    that are not replayed."""
    if tool_mode(body) is not None:
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        tools = copy.deepcopy(body.tools)  # vLLM pops `$defs` out of the tools' parameters it is given
        try:
            schema = get_json_schema_from_tools(
                body.tool_choice, tools, getattr(body, "parallel_tool_calls", None)
            )
        except Exception as exc:  # vLLM's own refusal of these tools (not a ValueError)
            raise ValueError(f"no schema for these tools ({type(exc).__name__})") from exc
        return schema if isinstance(schema, str) else json.dumps(schema)
    return schema_text(getattr(body, "response_format", None))


def parser_replays_tool_calls(serving_kwargs: dict[str, Any]) -> bool:
    """Whether nodes run with these vLLM serving arguments decode named and required tool calls under
    the JSON schema `constraint_schema` rebuilds (their tool parser has `supports_required_and_named`;
    hermes, llama3_json and other structural-tag parsers do not, and a reasoning parser delays the
    grammar). False when it cannot be told."""
    if serving_kwargs.get("reasoning_parser"):
        return False
    name = serving_kwargs.get("tool_call_parser")
    if not name:
        return False
    try:
        from vllm.tool_parsers import ToolParserManager

        return bool(ToolParserManager.get_tool_parser(name).supports_required_and_named)
    except Exception:  # noqa: BLE001 - an unknown parser or a plugin that fails to load: not replayed
        return False


def tool_calls_match(mode: str, name: str | None, text: str, calls: tuple[tuple[str, str], ...]) -> bool:
    """Whether `calls` ((name, arguments) as the client got them) are what vLLM makes of a constrained
    answer's `text` (vllm/parser/abstract_parser.py): named, one call of that function whose arguments
    are the text itself (none for blank text); required, one per item of the text's JSON array
    ({"name", "parameters"}; none if it does not parse), arguments compared as JSON."""
    if mode == "named":
        return calls == (((name or ""), text),) if text.strip() else calls == ()
    try:
        items = json.loads(text)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(
        isinstance(v, dict) and isinstance(v.get("name"), str) for v in items
    ):
        return calls == ()
    if len(items) != len(calls):
        return False
    for item, (call_name, arguments) in zip(items, calls):
        try:
            got = json.loads(arguments)
        except ValueError:
            return False
        if call_name != item["name"] or _canonical(got) != _canonical(item.get("parameters")):
            return False
    return True


def _canonical(value: Any) -> str:
    """JSON text that tells true from 1 and 0 from false (Python's == does not)."""
    return json.dumps(value, sort_keys=True)

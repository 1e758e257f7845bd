"""A request's structured-output constraint as vLLM compiles it: one mapping for the gateway (which
answers it offers validators) and the validators (which grammar they replay, `scoring.grammar`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
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
    schema; ('auto', None) for free text the node's tool parser reads after the fact; None for no tools,
    or tool_choice 'none'."""
    choice = getattr(body, "tool_choice", None)
    if not getattr(body, "tools", None) or choice == "none":
        return None
    if choice in (None, "auto"):
        return "auto", None
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
    mode = tool_mode(body)
    if mode is not None and mode[0] != "auto":
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


def replayed_parser(serving_kwargs: Sequence[dict[str, Any]]) -> str | None:
    """The tool parser every node runs, when validators can replay it (the nodes' vLLM serving
    arguments, one dict per node): one parser for all, no reasoning parser (it delays the grammar and
    the tool parse). None: tool calls are not offered for shadow checks."""
    names = {kw.get("tool_call_parser") for kw in serving_kwargs}
    if len(names) != 1 or any(kw.get("reasoning_parser") for kw in serving_kwargs):
        return None
    return names.pop() or None


def parser_replays_constrained_calls(parser: str | None) -> bool:
    """Whether `parser` has vLLM decode named and required tool calls under the JSON schema
    `constraint_schema` rebuilds (`supports_required_and_named`; hermes, llama3_json and other
    structural-tag parsers do not). False when it cannot be told."""
    if not parser:
        return False
    try:
        from vllm.tool_parsers import ToolParserManager

        return bool(ToolParserManager.get_tool_parser(parser).supports_required_and_named)
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
    return same_calls(tuple((v["name"], json.dumps(v.get("parameters"))) for v in items), calls)


def same_calls(expected: tuple[tuple[str, str], ...], calls: tuple[tuple[str, str], ...]) -> bool:
    """Two lists of (name, arguments) are the same calls: names equal, arguments equal as JSON (as text
    where either is not JSON)."""
    if len(expected) != len(calls):
        return False
    for (name, args), (got_name, got_args) in zip(expected, calls):
        if name != got_name or _as_json(args) != _as_json(got_args):
            return False
    return True


def _as_json(text: str) -> str:
    try:
        return _canonical(json.loads(text))
    except ValueError:
        return text


def _canonical(value: Any) -> str:
    """JSON text that tells true from 1 and 0 from false (Python's == does not)."""
    return json.dumps(value, sort_keys=True)

"""Shadow capture: what the gateway keeps of an organic request so validators can verify it later.

* Every request asks its node for token ids (vLLM's `return_token_ids`), so a node cannot tell a
  request that will be verified (or a validator's challenge, which asks for them) from any other.
  Clients that did not ask get the response exactly as without the flag: `strip_token_ids` turns the
  id lists back into the `null`s vLLM writes when the flag is off.
* A keyed-hash sample (`cluster.keyed_sample`, key known only to the gateway) of completed organic
  requests is offered to validators as `ServedCompletion`s. Only requests a validator can re-verify
  exactly are offered (`verifiable`): one choice, plain-text prompt or messages, temperature <= 1, and
  no parameter that reshapes the token distribution (penalties, logit bias...) other than a
  `response_format` (json_schema or json_object) or tools, under a schema of at most
  `MAX_SHADOW_SCHEMA` characters: validators replay its grammar's mask (`scoring.grammar`) and the
  nodes' tool parser, so structured answers and tool calls are checked too.
  Embeddings requests of at most `SHADOW_EMBED_INPUTS` texts and no other parameter (no `dimensions`,
  no truncation) are offered as `ServedEmbedding`s with the vectors the client got.
* What replay could add, and what it needs (issue 15): validators replay seeded sampling exactly
  (`scoring.replay`; every request has a seed since the gateway assigns one), which makes temperature
  > 1 verifiable and turns the weak logprob floor on sampled output into an exact per-token check.
  `ServedCompletion` carries the seed and top_p/top_k (replay is refused where they reshape).
  Still unverifiable even with replay: n > 1 (vLLM derives the choices' generators internally and the
  gateway keeps choice 0 only), top_p/top_k/min_p/penalties/logit bias (replay from the reference's
  top-k values cannot rebuild the masked distribution), streamed answers to tool_choice `auto` (vLLM's
  tool parser reads them incrementally; whole ones are offered with the calls the client got, as are
  named and required calls: `cluster.records.ToolUse`), tool_choice `none`, vLLM's own
  `structured_outputs` (regex, grammar, choice), images and other non-text content.

Offered items hold prompts and outputs: they live in memory only and never go to logs.
"""

from __future__ import annotations

import re
from typing import Any

from cluster.embeddings import vectors_of
from cluster.records import MAX_SHADOW_SCHEMA, SHADOW_EMBED_INPUTS, ServedCompletion, ServedEmbedding, ToolUse
from cluster.structured import constraint_schema, parser_replays_constrained_calls, tool_mode
from routing.intake import chat_messages, int_field, is_embedding, prompts
from routing.metering import Tally

# The parameters a verifiable request may set (a whitelist, so a new distribution-changing vLLM
# parameter is excluded by default). `stop` is allowed: stop strings only cut the text.
_VERIFIABLE_FIELDS = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stream",
        "stream_options",
        "stop",
        "n",
        "user",
        "return_token_ids",
        "request_id",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
_VERIFIABLE_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "user", "request_id"})
_IDS = re.compile(r'"(prompt_token_ids|token_ids)":\[[0-9,]*\]')


def verifiable(body: Any, tool_parser: str | None = "pythonic") -> bool:
    """True when a validator can re-verify this (validated) request exactly: judged on the client's own
    body (the node's copy sets request_id, seed, stream_options and return_token_ids; routing.gateway)."""
    if is_embedding(body):
        texts = prompts(body)
        return (
            body.model_fields_set <= _VERIFIABLE_EMBEDDING_FIELDS
            and len(texts) <= SHADOW_EMBED_INPUTS
            and all(isinstance(t, str) for t in texts)
        )
    if not body.model_fields_set <= _VERIFIABLE_FIELDS:
        return False
    if (getattr(body, "n", 1) or 1) != 1:
        return False
    if (getattr(body, "temperature", None) or 0.0) > 1.0:
        return False  # flatter than the model: rare tokens become likely, the logprob floor would misfire
    try:
        mode, schema = tool_mode(body), constraint_schema(body)
    except ValueError:
        return False  # a structural tag, tools vLLM refuses: not replayed
    tools = getattr(body, "tools", None)
    if tools and not _tool_calls_replayed(mode, tool_parser, bool(getattr(body, "stream", False))):
        return False
    if tools and getattr(body, "stop", None):
        return False  # vLLM parses the text a stop string cut, which the ids do not show
    if schema is not None and len(schema) > MAX_SHADOW_SCHEMA:
        return False
    if tools and sum(len(t.model_dump_json()) for t in tools) > MAX_SHADOW_SCHEMA:
        return False  # the validator renders them into the prompt: kept as small as the schema
    messages = chat_messages(body)
    if messages is not None:
        return all(
            isinstance(m, dict)
            and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant")
            and set(m) <= {"role", "content"}
            for m in messages
        )
    return isinstance(getattr(body, "prompt", None), str)


def _tool_calls_replayed(mode: tuple[str, str | None] | None, parser: str | None, stream: bool) -> bool:
    """Whether a validator can re-check a request with tools, served by nodes that run `parser`: named
    and required calls when the parser has vLLM decode them under its JSON schema; auto ones (the
    parser reads the free text) when not streamed (a streamed parse is incremental: not replayed).
    tool_choice none is not (the template may or may not render the tools)."""
    if mode is None or parser is None:
        return False
    if mode[0] == "auto":
        return not stream
    return parser_replays_constrained_calls(parser)


def strip_token_ids(piece: str) -> str:
    """An SSE event or JSON body with token id lists replaced by null (as vLLM writes without the flag)."""
    return _IDS.sub(r'"\1":null', piece) if 'token_ids":[' in piece else piece


class Capture:
    """A sampled organic request: its body, and on completion what the node sent (for a generation, its
    choice 0 from the request's `Tally`, i.e. the same parse the gateway meters with; for embeddings,
    the vectors the client got)."""

    __slots__ = ("body", "request_id", "tool_parser")

    def __init__(self, request_id: str, body: Any, tool_parser: str | None = None) -> None:
        self.request_id, self.body, self.tool_parser = request_id, body, tool_parser

    def served(self, node_id: str, tally: Tally, completion_tokens: int) -> ServedCompletion:
        """`completion_tokens`: what the node *reported*, so validators can hold it to its word."""
        b = self.body
        text, ids, finish_reason = tally.choice(0)
        messages = chat_messages(b)
        max_tokens = int_field(b, "max_completion_tokens") or int_field(b, "max_tokens")
        temperature = getattr(b, "temperature", None)
        stop = getattr(b, "stop", None)
        tool_use = self._tool_use(tally)
        if tool_use is not None and finish_reason == "tool_calls":
            finish_reason = "stop"  # vLLM reports a required call's natural end as tool_calls
        return ServedCompletion(
            seed=getattr(b, "seed", None),
            top_p=getattr(b, "top_p", None),
            top_k=getattr(b, "top_k", None),
            stream=bool(getattr(b, "stream", False)),
            temperature_set=temperature is not None,
            request_id=self.request_id,
            node_id=node_id,
            model=b.model,
            prompt=None if messages is not None else b.prompt,
            messages=None
            if messages is None
            else tuple({"role": m["role"], "content": m["content"]} for m in messages),
            text=text,
            token_ids=None if ids is None else tuple(ids),
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else float(temperature),
            stop_strings=bool(stop),
            json_schema=constraint_schema(b),
            tool_use=tool_use,
        )

    def _tool_use(self, tally: Tally) -> ToolUse | None:
        """A request with tools: its tool choice, the nodes' parser and the calls the client got (None
        without tools)."""
        mode = tool_mode(self.body)
        if mode is None:
            return None
        return ToolUse(
            mode=mode[0],
            name=mode[1],
            parser=self.tool_parser,
            tools=tuple(t.model_dump() for t in self.body.tools),
            calls=tally.tool_calls(0),
        )

    def served_embedding(self, node_id: str, answer: Any) -> ServedEmbedding:
        """`answer`: the node's parsed embeddings answer (cluster.embeddings), as the client got it."""
        return ServedEmbedding(
            request_id=self.request_id,
            node_id=node_id,
            model=self.body.model,
            inputs=tuple(prompts(self.body)),
            vectors=tuple(tuple(v.tolist()) for v in vectors_of(answer)),
        )

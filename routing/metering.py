"""Metering: the gateway counts what it really forwarded; a node's own usage report is only compared.

    completion tokens = per choice, min(the token ids the node returned (vLLM `return_token_ids`, asked
                        on every request) that are in the tokenizer's vocabulary, the tokens of the text
                        the client got + `CHOICE_SLACK`) if the ids decode to that text, else the
                        tokens of the text: a node is never paid for ids the client did not get as text
                        (padding, special ids, a per-character tokenisation)
    prompt tokens     = the gateway's own count: the model's tokenizer, with its chat template for chat
    both clamped      : completion <= max_tokens x n x prompts (or the context), prompt <= context x prompts

Ids are checked as they arrive (`Tally.add`): an id outside the model's vocabulary, or more ids than
max_tokens allows, is a malformed answer (ValueError), which the gateway counts against the node.
Counting itself never raises: a tokenizer that fails falls back to a bound that needs none.

A node's reported `usage` is kept only to compare: a disagreement is counted per node
(`meritnet_usage_disagreements_total`) and validators see the reported count in shadow items, where
an inflated one is fraud. A model with no tokenizer configured (`GatewayConfig.metered_models`) is
billed min(ids, UTF-8 bytes of the text + slack) for completions (byte-level tokenizers never make more
tokens than bytes) and the node's report, clamped, for prompts; the fallback is counted too
(`field="unmetered_prompt"`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.completions import MAX_CHOICES, MAX_COUNT, MAX_IDS, NodeBody, NodeUsage
from cluster.records import NodeTask
from routing import metrics
from routing.intake import chat_messages, int_field, is_embedding, max_tokens, prompts

log = logging.getLogger("meritnet.metering")


class MeteredModel(BaseModel):
    """Where the gateway finds a model's tokenizer (the trusted weights' folder or HF id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        min_length=1, description="Path or HF id with the model's tokenizer (and chat template)."
    )
    max_model_len: int = Field(ge=1, le=MAX_COUNT, description="Context length: the bound of one prompt.")
    task: NodeTask = Field(
        default="generate", description="What the model's nodes serve: 'generate' or 'embed' (NodeSpec.task)."
    )


# Tokens a choice may bill beyond its text's own tokenisation: an end-of-sequence id (it decodes to
# nothing) and one for a split at a boundary that differs from the canonical one.
CHOICE_SLACK = 2


class TokenCounter:
    """Counts tokens with one model's tokenizer (loaded once per gateway replica).

    `tokens`: ids the tokenizer knows (billable); `vocab_size`: ids the model can emit (its embedding
    may be padded beyond the tokenizer); an id at or above it is a malformed answer."""

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int | None = None) -> None:
        self.tok, self.max_model_len = tokenizer, max_model_len
        self.tokens: int | None = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        self.vocab_size = max(vocab_size or 0, self.tokens or 0) or None

    @classmethod
    def load(cls, model: MeteredModel) -> TokenCounter:
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.source)
        try:
            config = AutoConfig.from_pretrained(model.source)
            vocab = getattr(config, "vocab_size", None) or getattr(
                config.get_text_config(), "vocab_size", None
            )
        except Exception as exc:  # noqa: BLE001 - a tokenizer-only folder: the tokenizer's size bounds ids
            log.info("no model config beside the tokenizer of %s (%s)", model.source, type(exc).__name__)
            vocab = None
        return cls(tok, model.max_model_len, vocab if isinstance(vocab, int) else None)

    def prompt_tokens(self, body: Any) -> int:
        """Tokens of the request's prompt(s) (an embeddings request's inputs), as the engine sees them:
        with special tokens unless the request turned them off, cut to `truncate_prompt_tokens` per
        prompt (-1: the context) when it asked for that. Raises if it cannot tell."""
        cut = int_field(body, "truncate_prompt_tokens")
        cut = self.max_model_len if cut == -1 else cut if cut is not None and cut > 0 else MAX_COUNT
        messages = chat_messages(body)
        if messages is not None:
            # as vLLM and the validators do: render the template, then tokenize without extra specials
            text = self.tok.apply_chat_template(
                [message_dict(m) for m in messages], add_generation_prompt=True, tokenize=False
            )
            return min(cut, len(self.tok.encode(text, add_special_tokens=False)))
        special = getattr(body, "add_special_tokens", True) is not False
        return sum(
            min(
                cut, len(p) if not isinstance(p, str) else len(self.tok.encode(p, add_special_tokens=special))
            )
            for p in prompts(body)
        )

    def text_tokens(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def completion_tokens(self, ids: Sequence[int], text: str) -> int:
        """One choice: if `ids` decode to `text` (replacement characters aside: a byte-level token may
        end mid-character), the ids the tokenizer knows, at most the text's own tokens + CHOICE_SLACK;
        else the tokens of `text` itself."""
        known = [i for i in ids if self.tokens is None or i < self.tokens]
        decoded = self.tok.decode(known, skip_special_tokens=True)
        own = self.text_tokens(text)
        if decoded.replace("\ufffd", "") == text.replace("\ufffd", ""):
            return min(len(known), own + CHOICE_SLACK)
        return own


def message_dict(message: Any) -> dict:
    """A chat message as vLLM hands it to the chat template: an assistant's tool call arguments parsed
    from their JSON text into a dict (vLLM's own rule, so the template renders both alike). Never
    raises: arguments that are not JSON stay text (vLLM refuses such a request; the template cannot
    render it, and counting falls back to its bound)."""
    out = message if isinstance(message, dict) else message.model_dump(exclude_none=True)
    calls = out.get("tool_calls") if out.get("role") == "assistant" else None
    if not calls:
        return out
    return {**out, "tool_calls": [_with_parsed_arguments(c) for c in calls]}


def _with_parsed_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class Tally:
    """What one request's node sent, choice by choice, as parsed by `cluster.completions`, checked as
    it arrives: `add` raises ValueError for an id outside `vocab_size`, a choice index beyond `choices`
    or more ids than `per_choice` in a choice (an honest engine never sends any of these). Ids are
    appended in place, so a long stream costs time linear in what it sends."""

    __slots__ = ("calls", "choices", "finish", "ids", "per_choice", "reported", "text", "vocab_size")

    def __init__(
        self, vocab_size: int | None = None, per_choice: int = MAX_IDS, choices: int = MAX_CHOICES
    ) -> None:
        self.vocab_size, self.per_choice, self.choices = vocab_size, per_choice, choices
        self.ids: dict[int, list[int] | None] = {}
        self.text: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.calls: dict[int, dict[int, list[str]]] = {}  # choice -> tool call -> [name, arguments]
        self.reported: NodeUsage | None = None

    @classmethod
    def for_request(cls, body: Any, counter: TokenCounter | None) -> Tally:
        """A tally bounded by what `body` allows: its max_tokens per choice (else the context), its
        n x prompts choices, and the model's vocabulary when the gateway has its tokenizer."""
        max_len = counter.max_model_len if counter else None
        per_choice = max_tokens(body) or max_len
        return cls(
            counter.vocab_size if counter else None,
            min(MAX_IDS, per_choice or MAX_IDS),
            min(MAX_CHOICES, max(1, int_field(body, "n") or 1) * _prompts(body)),
        )

    def add(self, body: NodeBody) -> None:
        """Take one body (or stream chunk): all of it, or nothing (ValueError) if it breaks a bound."""
        pending: dict[int, int] = {}  # ids per choice in this body (an index may repeat)
        for ch in body.choices:
            self._check(ch.index, ch.token_ids, pending)
        for ch in body.choices:
            self.text.setdefault(ch.index, []).append(ch.content)
            if ch.token_ids is not None:
                held = self.ids.get(ch.index)
                if held is None:
                    held = self.ids[ch.index] = []
                held.extend(ch.token_ids)  # in place: each id is copied once
            else:
                self.ids.setdefault(ch.index, None)
            self.finish[ch.index] = ch.finish_reason or self.finish.get(ch.index)
            msg = ch.message or ch.delta
            if msg is not None and msg.tool_calls:
                self._add_calls(ch.index, msg.tool_calls)
        if body.usage is not None:
            self.reported = body.usage

    def _check(self, index: int, new: list[int] | None, pending: dict[int, int]) -> None:
        if index >= self.choices:
            raise ValueError(f"choice index {index} of a request with {self.choices} choices")
        if not new:
            return
        pending[index] = pending.get(index, 0) + len(new)
        if len(self.ids.get(index) or ()) + pending[index] > self.per_choice:
            raise ValueError(f"more than {self.per_choice} token ids in one choice")
        if self.vocab_size is not None and max(new) >= self.vocab_size:
            raise ValueError(f"a token id outside the vocabulary of {self.vocab_size}")

    def _add_calls(self, index: int, calls: list) -> None:
        """A message's tool calls, or a stream delta's pieces of them (a call's name once, its
        arguments in fragments, by the call's `index`)."""
        held = self.calls.setdefault(index, {})
        for position, call in enumerate(calls):
            if call.function is None:
                continue
            name_args = held.setdefault(call.index if call.index is not None else position, ["", ""])
            name_args[0] += call.function.name or ""
            name_args[1] += call.function.arguments or ""

    def tool_calls(self, index: int = 0) -> tuple[tuple[str, str], ...]:
        """(name, arguments) of each tool call of one choice, as the client got them (joined)."""
        held = self.calls.get(index, {})
        return tuple((held[i][0], held[i][1]) for i in sorted(held))

    def choice(self, index: int = 0) -> tuple[str, list[int] | None, str | None]:
        """(text, ids or None, finish_reason) of one choice."""
        return "".join(self.text.get(index, ())), self.ids.get(index), self.finish.get(index)


def _prompts(body: Any) -> int:
    """Prompts of one request: a completions request may batch several (a list of strings or lists), an
    embeddings request several inputs."""
    return 1 if chat_messages(body) is not None else max(1, len(prompts(body)))


_TEMPLATE_BYTES = 64  # allowance per message (and per request) for a chat template's own tokens


def _prompt_bytes(body: Any) -> int:
    """An upper bound of the prompt's tokens that needs no tokenizer: byte-level BPE never makes more
    tokens than bytes; token-id prompts count themselves; chat templates add a little per message."""
    messages = chat_messages(body)
    if messages is not None:
        return _TEMPLATE_BYTES + sum(
            _TEMPLATE_BYTES + len(json.dumps(message_dict(m)).encode()) for m in messages
        )
    return sum(_TEMPLATE_BYTES + len(p.encode()) if isinstance(p, str) else len(p) for p in prompts(body))


def limits(body: Any, max_model_len: int | None) -> tuple[int, int]:
    """(prompt bound, completion bound) of a request: what an honest engine can count for it."""
    count = _prompts(body)
    n = max(1, int_field(body, "n") or 1)
    limit = max_tokens(body)
    per_choice = limit if limit is not None else (max_model_len or MAX_COUNT)
    context = max_model_len or MAX_COUNT
    prompt_cap = min(MAX_COUNT, context * count, _prompt_bytes(body))
    if is_embedding(body):  # vectors, not tokens: nothing is generated
        return prompt_cap, 0
    return prompt_cap, min(MAX_COUNT, per_choice * n * count)


def metered(body: Any, tally: Tally, counter: TokenCounter | None) -> tuple[int, int, bool]:
    """(prompt tokens, completion tokens, prompt counted by the gateway) billed for one request. Pure:
    call it as often as needed; `observe` reports disagreements once per request. Never raises."""
    prompt_cap, completion_cap = limits(body, counter.max_model_len if counter else None)
    reported = tally.reported or NodeUsage()
    completion, bound, unlisted = 0, 0, False
    for index, ids in tally.ids.items():
        text = "".join(tally.text.get(index, ()))
        if ids is None:  # no ids (token-id capture off): the node's word, bounded by the text
            unlisted = True
            bound += _text_tokens(text, counter) + CHOICE_SLACK
        else:
            completion += _choice_tokens(ids, text, counter)
    if unlisted:
        completion = min(reported.completion_tokens, completion + bound)
    prompt, counted = reported.prompt_tokens, False
    if counter is not None:
        try:
            prompt, counted = counter.prompt_tokens(body), True
        except Exception as exc:  # noqa: BLE001 - exotic content parts: the node's count, clamped
            log.info("prompt of a %s request not countable here (%s)", body.model, type(exc).__name__)
    return max(0, min(prompt, prompt_cap)), max(0, min(completion, completion_cap)), counted


def _text_tokens(text: str, counter: TokenCounter | None) -> int:
    """The tokens of `text`: the tokenizer's count, or its UTF-8 bytes (never fewer) without one."""
    if counter is not None:
        try:
            return counter.text_tokens(text)
        except Exception as exc:  # noqa: BLE001 - a tokenizer failure must not lose the record
            log.warning("completion text not countable (%s); bounded by its bytes", type(exc).__name__)
    return len(text.encode("utf-8", "surrogatepass"))


def _choice_tokens(ids: list[int], text: str, counter: TokenCounter | None) -> int:
    """One choice's billed completion tokens (see the module's docstring)."""
    if counter is not None:
        try:
            return counter.completion_tokens(ids, text)
        except Exception as exc:  # noqa: BLE001 - e.g. an id the tokenizer cannot decode
            log.warning("completion ids not countable (%s); bounded by the text", type(exc).__name__)
    return min(len(ids), _text_tokens(text, None) + CHOICE_SLACK)


def reservation(body: Any, counter: TokenCounter | None) -> int:
    """Tokens to hold against a key's token limit while `body` runs: its prompt (the gateway's count
    when it has the tokenizer, else the bound that needs none) and all it may generate
    (max_tokens x n x prompts, or the context)."""
    prompt_cap, completion_cap = limits(body, counter.max_model_len if counter else None)
    prompt = prompt_cap
    if counter is not None:
        try:
            prompt = min(prompt_cap, counter.prompt_tokens(body))
        except Exception as exc:  # noqa: BLE001 - exotic content parts: the bound
            log.info("prompt not countable at admission (%s)", type(exc).__name__)
    return prompt + completion_cap


def observe(node_id: str, tally: Tally, prompt: int, completion: int, counted: bool) -> None:
    """Count (and log, without content) where the node's own report disagrees with the bill."""
    if not counted:
        metrics.USAGE_DISAGREEMENTS.labels(node_id, "unmetered_prompt").inc()
    if tally.reported is None:
        return
    for field, ours, theirs in (
        ("prompt", prompt, tally.reported.prompt_tokens),
        ("completion", completion, tally.reported.completion_tokens),
    ):
        if ours != theirs and (field == "completion" or counted):
            metrics.USAGE_DISAGREEMENTS.labels(node_id, field).inc()
            log.warning("node %s reported %d %s tokens; the gateway counted %d", node_id, theirs, field, ours)

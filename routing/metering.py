"""Metering: the gateway counts what it really forwarded; a node's own usage report is only compared.

    completion tokens = the token ids the node returned (vLLM `return_token_ids`, asked on every
                        request), if they decode with the model's tokenizer to the text the client got;
                        otherwise the tokens of that text (a node is never paid for ids it did not send
                        as text)
    prompt tokens     = the gateway's own count: the model's tokenizer, with its chat template for chat
    both clamped      : completion <= max_tokens x n x prompts (or the context), prompt <= context x prompts

A node's reported `usage` is kept only to compare: a disagreement is counted per node
(`meritnet_usage_disagreements_total`) and validators see the reported count in shadow items, where
an inflated one is fraud. A model with no tokenizer configured (`GatewayConfig.metered_models`) falls
back to the ids for completions and to the node's report, clamped, for prompts; the fallback is
counted too (`field="unmetered_prompt"`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.completions import MAX_COUNT, NodeBody, NodeUsage
from routing import metrics
from routing.intake import chat_messages, int_field

log = logging.getLogger("meritnet.metering")


class MeteredModel(BaseModel):
    """Where the gateway finds a model's tokenizer (the trusted weights' folder or HF id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        min_length=1, description="Path or HF id with the model's tokenizer (and chat template)."
    )
    max_model_len: int = Field(ge=1, le=MAX_COUNT, description="Context length: the bound of one prompt.")


class TokenCounter:
    """Counts tokens with one model's tokenizer (loaded once per gateway replica)."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tok, self.max_model_len = tokenizer, max_model_len

    @classmethod
    def load(cls, model: MeteredModel) -> TokenCounter:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model.source), model.max_model_len)

    def prompt_tokens(self, body: Any) -> int:
        """Tokens of the request's prompt(s), as the engine sees them. Raises if it cannot tell."""
        messages = chat_messages(body)
        if messages is not None:
            # as vLLM and the validators do: render the template, then tokenize without extra specials
            text = self.tok.apply_chat_template(
                [_as_dict(m) for m in messages], add_generation_prompt=True, tokenize=False
            )
            return len(self.tok.encode(text, add_special_tokens=False))
        prompt = body.prompt
        if isinstance(prompt, str):
            return len(self.tok.encode(prompt, add_special_tokens=True))
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        return sum(
            len(p) if not isinstance(p, str) else len(self.tok.encode(p, add_special_tokens=True))
            for p in prompt
        )

    def completion_tokens(self, ids: Sequence[int], text: str) -> int:
        """len(ids) if they decode to `text` (replacement characters aside: a byte-level token may end
        mid-character), else the tokens of `text` itself."""
        decoded = self.tok.decode(list(ids), skip_special_tokens=True)
        if decoded.replace("\ufffd", "") == text.replace("\ufffd", ""):
            return len(ids)
        return len(self.tok.encode(text, add_special_tokens=False))


def _as_dict(message: Any) -> dict:
    return message if isinstance(message, dict) else message.model_dump(exclude_none=True)


class Tally:
    """What one request's node sent, choice by choice, as parsed by `cluster.completions`."""

    __slots__ = ("finish", "ids", "reported", "text")

    def __init__(self) -> None:
        self.ids: dict[int, list[int] | None] = {}
        self.text: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.reported: NodeUsage | None = None

    def add(self, body: NodeBody) -> None:
        for ch in body.choices:
            self.text.setdefault(ch.index, []).append(ch.content)
            if ch.token_ids is not None:
                self.ids[ch.index] = (self.ids.get(ch.index) or []) + ch.token_ids
            else:
                self.ids.setdefault(ch.index, None)
            self.finish[ch.index] = ch.finish_reason or self.finish.get(ch.index)
        if body.usage is not None:
            self.reported = body.usage

    def choice(self, index: int = 0) -> tuple[str, list[int] | None, str | None]:
        """(text, ids or None, finish_reason) of one choice."""
        return "".join(self.text.get(index, ())), self.ids.get(index), self.finish.get(index)


_TEMPLATE_BYTES = 64  # allowance per message (and per request) for a chat template's own tokens


def _prompt_bytes(body: Any) -> int:
    """An upper bound of the prompt's tokens that needs no tokenizer: byte-level BPE never makes more
    tokens than bytes; token-id prompts count themselves; chat templates add a little per message."""
    messages = chat_messages(body)
    if messages is not None:
        return _TEMPLATE_BYTES + sum(
            _TEMPLATE_BYTES + len(json.dumps(_as_dict(m)).encode()) for m in messages
        )
    prompt = body.prompt
    if isinstance(prompt, str):
        return _TEMPLATE_BYTES + len(prompt.encode())
    if prompt and isinstance(prompt[0], int):
        return len(prompt)
    return sum(_TEMPLATE_BYTES + (len(p.encode()) if isinstance(p, str) else len(p)) for p in prompt)


def limits(body: Any, max_model_len: int | None) -> tuple[int, int]:
    """(prompt bound, completion bound) of a request: what an honest engine can count for it."""
    prompt = getattr(body, "prompt", None)
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    n = max(1, int_field(body, "n") or 1)
    max_tokens = int_field(body, "max_completion_tokens") or int_field(body, "max_tokens")
    per_choice = max_tokens if max_tokens is not None else (max_model_len or MAX_COUNT)
    context = max_model_len or MAX_COUNT
    prompt_cap = min(MAX_COUNT, context * prompts, _prompt_bytes(body))
    return prompt_cap, min(MAX_COUNT, per_choice * n * prompts)


def metered(body: Any, tally: Tally, counter: TokenCounter | None) -> tuple[int, int, bool]:
    """(prompt tokens, completion tokens, prompt counted by the gateway) billed for one request. Pure:
    call it as often as needed; `observe` reports disagreements once per request."""
    prompt_cap, completion_cap = limits(body, counter.max_model_len if counter else None)
    reported = tally.reported or NodeUsage()
    completion = 0
    for index, ids in tally.ids.items():
        if ids is None:  # no ids (token-id capture off): the node's word, clamped below
            completion = reported.completion_tokens
            break
        text = "".join(tally.text.get(index, ()))
        completion += counter.completion_tokens(ids, text) if counter else len(ids)
    prompt, counted = reported.prompt_tokens, False
    if counter is not None:
        try:
            prompt, counted = counter.prompt_tokens(body), True
        except Exception as exc:  # noqa: BLE001 - exotic content parts: the node's count, clamped
            log.info("prompt of a %s request not countable here (%s)", body.model, type(exc).__name__)
    return max(0, min(prompt, prompt_cap)), max(0, min(completion, completion_cap)), counted


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

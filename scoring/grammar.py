"""Replaying a structured-output constraint: which tokens the node's grammar allowed at each position.

A request with `response_format` `json_schema` or `json_object` is decoded under a grammar: vLLM's
xgrammar backend masks every token the JSON schema forbids before sampling, so an honest greedy node
emits the argmax *among the allowed tokens*, not the model's overall argmax (the first `{` of a JSON
answer is rarely the model's own first choice). To judge such an answer the validator replays the same
mask over the node's token ids: xgrammar compiled from the same schema text, with the same options as
the network's nodes (`cluster.deployment.EngineDefaults`: no free whitespace, `,` and `:` separators)
and the model's stop tokens, steps through the ids and records each position's bitmask.

`scoring.verify` then measures a token's margin against the best *allowed* token, and a token the
grammar rejects is one no honest node emits. Schemas come from clients: the gateway offers only short
ones (`cluster.records.MAX_SHADOW_SCHEMA`), compiled grammars are cached per schema text, and a schema
xgrammar cannot compile is no verdict (the node could not have served it either).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class GrammarWalk:
    """The grammar's masks along one token sequence. `rejected_at`: the first position whose token the
    grammar does not allow (None: every token allowed); positions from there on have no mask."""

    masks: tuple[np.ndarray, ...]  # one packed bitmask (int32 words) per position up to `rejected_at`
    rejected_at: int | None

    def forced(self, position: int) -> bool:
        """Only one token was allowed here: the node had no choice, so the token is no evidence."""
        if position >= len(self.masks):
            return False
        return int(np.unpackbits(self.masks[position].view(np.uint8)).sum()) == 1

    def allows(self, position: int, token_id: int) -> bool:
        if position >= len(self.masks):
            return True  # after a rejection nothing is known: callers stop judging there
        word = token_id >> 5
        mask = self.masks[position]
        return 0 <= word < mask.shape[0] and bool((int(mask[word]) >> (token_id & 31)) & 1)


class JsonGrammar:
    """xgrammar over one model's tokenizer, set up as vLLM's xgrammar backend sets it up."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=1, cache_enabled=False)
        self._stop = sorted(stop_token_ids)
        self._compiled = functools.lru_cache(maxsize=64)(self._compile)

    def _compile(self, schema: str) -> Any:
        # The network's nodes run with disable_any_whitespace (cluster.deployment.EngineDefaults).
        return self._compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def walk(self, schema: str, token_ids: Sequence[int]) -> GrammarWalk:
        """Step the grammar through `token_ids`, keeping each position's mask. Raises what xgrammar
        raises for a schema it cannot compile."""
        matcher = self._xgr.GrammarMatcher(self._compiled(schema), override_stop_tokens=self._stop)
        bitmask = self._xgr.allocate_token_bitmask(1, self._info.vocab_size)
        masks: list[np.ndarray] = []
        for position, token in enumerate(token_ids):
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(bitmask[0].numpy().copy())
            if not matcher.accept_token(int(token)):
                return GrammarWalk(tuple(masks), position)
        return GrammarWalk(tuple(masks), None)

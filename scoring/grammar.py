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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class GrammarWalk:
    """What the grammar allowed along one token sequence, for the tokens verification looks at (each
    position's emitted token and the reference's top-k): `allowed[t]` holds those of them the grammar
    allowed at position t, `forced[t]` whether it allowed one token only. `rejected_at`: the first
    position whose token the grammar does not allow (None: all allowed); nothing is known after it."""

    allowed: tuple[frozenset[int], ...]
    forced: tuple[bool, ...]
    rejected_at: int | None

    def is_forced(self, position: int) -> bool:
        """Only one token was allowed here: the node had no choice, so the token is no evidence."""
        return position < len(self.forced) and self.forced[position]

    def allows(self, position: int, token_id: int) -> bool:
        if position >= len(self.allowed):
            return True  # after a rejection nothing is known: callers stop judging there
        return token_id in self.allowed[position]


class JsonGrammar:
    """xgrammar over one model's tokenizer, set up as vLLM's xgrammar backend sets it up."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=1, cache_enabled=False)
        self._stop = sorted(stop_token_ids)
        self.compiled = functools.lru_cache(maxsize=64)(self._compile)

    def _compile(self, schema: str) -> Any:
        """The compiled grammar of `schema` (cached; raises what xgrammar raises for a schema it cannot
        compile). Validators call it first, off the engine lock, with a time limit."""
        # The network's nodes run with disable_any_whitespace (cluster.deployment.EngineDefaults).
        return self._compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def walk(
        self, schema: str, token_ids: Sequence[int], candidates: Sequence[Iterable[int]] = ()
    ) -> GrammarWalk:
        """Step the grammar through `token_ids`; at each position keep which of that position's token and
        `candidates[t]` it allowed (one bitmask lives at a time: memory does not grow with the vocabulary
        x the answer's length)."""
        matcher = self._xgr.GrammarMatcher(self.compiled(schema), override_stop_tokens=self._stop)
        bitmask = self._xgr.allocate_token_bitmask(1, self._info.vocab_size)
        allowed: list[frozenset[int]] = []
        forced: list[bool] = []
        for position, token in enumerate(token_ids):
            matcher.fill_next_token_bitmask(bitmask)
            words = bitmask[0].numpy()
            forced.append(int(np.unpackbits(words.view(np.uint8)).sum()) == 1)
            asked = {int(token), *(candidates[position] if position < len(candidates) else ())}
            allowed.append(frozenset(t for t in asked if _bit(words, t)))
            if not matcher.accept_token(int(token)):
                return GrammarWalk(tuple(allowed), tuple(forced), position)
        return GrammarWalk(tuple(allowed), tuple(forced), None)


def _bit(words: np.ndarray, token_id: int) -> bool:
    word = token_id >> 5
    return 0 <= word < words.shape[0] and bool((int(words[word]) >> (token_id & 31)) & 1)

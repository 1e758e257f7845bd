"""Private challenge content and an organic parameter mix: what makes a challenge look like any request.

* `RequestShape`: everything about a request except its words (kind, roles of the messages, words per
  message, temperature, top_p, max_tokens, stream, n). `shape_of(ServedCompletion)` reads it from an
  organic request the validator shadow-verifies: parameters and lengths only, never the text.
* `OrganicMix`: the shapes of the last `window` organic requests seen (a bootstrap of the real joint
  distribution: a challenge copies one whole shape, so correlations such as "long chats stream" hold),
  and a prior until the first ones arrive. Only verifiable organic requests are offered on the shadow
  feed, so the mix is that of verifiable traffic, which is what challenges must be anyway.
* `PromptWriter`: passages (whole sentences) of text sources, picked with the validator's private RNG.
  Its output is never stored or shared, but a node that knows the sources can look passages up, so
  deployments should point `text_sources` at private text: the default, the model's public tokenizer
  corpus, is a fallback (as matchable as the old public pool, only larger).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_WORD = re.compile(r"\S+")
_END = (".", "?", "!")
_SPEAKERS = frozenset({"User:", "Assistant:"})


@dataclass(frozen=True, slots=True)
class RequestShape:
    """A request without its words. `roles`/`words`: per message (one entry for a completions prompt)."""

    kind: Literal["chat", "completion"]
    roles: tuple[str, ...]
    words: tuple[int, ...]
    temperature: float | None  # None: not set (the OpenAI default 1)
    max_tokens: int | None
    top_p: float | None = None
    stream: bool | None = None  # None: unknown (drawn at the configured rate)
    n: int = 1


# Before any organic request is seen: a plausible chat-API mix (mostly sampled chat, some greedy and
# completions). Replaced by the observed shapes as soon as they arrive.
_PRIOR: tuple[RequestShape, ...] = tuple(
    RequestShape(kind, roles, words, temp, mt, None, stream)
    for kind, roles, words in (
        ("chat", ("user",), (12,)),
        ("chat", ("user",), (30,)),
        ("chat", ("system", "user"), (15, 20)),
        ("chat", ("user", "assistant", "user"), (10, 40, 8)),
        ("completion", ("prompt",), (25,)),
    )
    for temp in (None, 0.0, 0.7, 1.0)
    for mt in (32, 64, 128)
    for stream in (False, True)
)


def shape_of(item) -> RequestShape:
    """The shape of a served organic completion (`cluster.records.ServedCompletion`)."""
    if item.messages is not None:
        roles = tuple(m["role"] for m in item.messages)
        words = tuple(len(_WORD.findall(m["content"])) for m in item.messages)
        kind: Literal["chat", "completion"] = "chat"
    else:
        roles, words, kind = ("prompt",), (len(_WORD.findall(item.prompt or "")),), "completion"
    temperature = item.temperature if item.temperature_set else None
    return RequestShape(
        kind,
        roles,
        words,
        temperature,
        item.max_tokens,
        top_p=item.top_p,
        stream=item.stream,
    )


class OrganicMix:
    """Draws request shapes like the organic ones seen last (the prior until there are any)."""

    def __init__(self, window: int = 512, prior: Sequence[RequestShape] = _PRIOR) -> None:
        self._seen: list[RequestShape] = []
        self._window = window
        self._next = 0
        self._prior = tuple(prior)

    def observe(self, shape: RequestShape) -> None:
        if len(self._seen) < self._window:
            self._seen.append(shape)
        else:  # ring buffer: the mix follows the traffic
            self._seen[self._next] = shape
            self._next = (self._next + 1) % self._window

    @property
    def observed(self) -> int:
        return len(self._seen)

    def draw(self, rng: random.Random) -> RequestShape:
        return rng.choice(self._seen or self._prior)


def corpus_text() -> list[str]:
    """The default text source: the default model's tokenizer corpus (public; see module docstring)."""
    from cluster.model import corpus_files

    return [p.read_text() for p in corpus_files()]


class PromptWriter:
    """Passages of `texts`: `write(rng, words)` starts at a random sentence and ends at the sentence end
    nearest `words` words. Real sentences in their own order read like what people send (an order-2
    Markov chain over the same text was tried first: a gradient-boosted classifier told its output from
    human text at AUC 0.79 on commas, sentence counts and word variety alone)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._words = [w for text in texts for w in _WORD.findall(text) if w not in _SPEAKERS]
        self._starts = [
            i
            for i, w in enumerate(self._words)
            if w[:1].isupper() and (i == 0 or self._words[i - 1].endswith(_END))
        ]
        if not self._starts:
            raise ValueError("PromptWriter needs text with at least one capitalised sentence")

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path]) -> PromptWriter:
        return cls(Path(p).read_text(errors="replace") for p in paths)

    def write(self, rng: random.Random, words: int) -> str:
        words = max(1, words)
        best: list[str] = []
        for _ in range(16):  # of a few random starts, the passage whose length is nearest the target
            start = rng.choice(self._starts)
            out = self._words[start : start + 3 * words + 2]  # a hard cut if no sentence ends in reach
            ends = [i + 1 for i, w in enumerate(out) if w.endswith(_END)] or [len(out)]
            out = out[: min(ends, key=lambda e: abs(e - words))]
            if not best or abs(len(out) - words) < abs(len(best) - words):
                best = out
            if len(best) == words:
                break
        return " ".join(best)

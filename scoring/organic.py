"""Private challenge content and an organic parameter mix: what makes a challenge look like any request.

* `RequestShape`: everything about a request except its words (kind, roles of the messages, words,
  sentences and ending of each message, temperature, top_p, max_tokens, stream, n). `shape_of` reads it
  from an organic request the validator shadow-verifies (`ServedCompletion`): parameters and counts,
  never the text.
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
    """A request without its words. `roles`/`words`/`ends`: per message (one entry for a completions
    prompt); an end is "." (a sentence end), "?" (a question) or "" (anything else: cut mid-sentence);
    no ends: unknown (sentence ends)."""

    kind: Literal["chat", "completion"]
    roles: tuple[str, ...]
    words: tuple[int, ...]
    temperature: float | None  # None: not set (the OpenAI default 1)
    max_tokens: int | None
    top_p: float | None = None
    stream: bool | None = None  # None: unknown (drawn at the configured rate)
    n: int = 1
    ends: tuple[str, ...] = ()
    sentences: tuple[int, ...] = ()  # sentence ends per message; none: unknown

    def messages(self) -> list[tuple[str, int, str, int | None]]:
        """(role, words, end, sentences) per message; unknown ends are sentence ends, unknown counts None."""
        n = len(self.words)
        ends = self.ends if len(self.ends) == n else (".",) * n
        sentences = self.sentences if len(self.sentences) == n else (None,) * n
        return list(zip(self.roles, self.words, ends, sentences))


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


def ending(text: str) -> str:
    """The class of a message's last character: "?", "." (any sentence end) or ""."""
    last = text.rstrip()[-1:]
    return "?" if last == "?" else "." if last in _END else ""


def shape_of(item) -> RequestShape:
    """The shape of a served organic completion (`cluster.records.ServedCompletion`)."""
    if item.messages is not None:
        roles = tuple(m["role"] for m in item.messages)
        texts = [m["content"] for m in item.messages]
        kind: Literal["chat", "completion"] = "chat"
    else:
        roles, texts, kind = ("prompt",), [item.prompt or ""], "completion"
    words = tuple(len(_WORD.findall(t)) for t in texts)
    temperature = item.temperature if item.temperature_set else None
    return RequestShape(
        kind,
        roles,
        words,
        temperature,
        item.max_tokens,
        top_p=item.top_p,
        stream=item.stream,
        ends=tuple(ending(t) for t in texts),
        sentences=tuple(sum(w.endswith(_END) for w in _WORD.findall(t)) for t in texts),
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

    def write(self, rng: random.Random, words: int, end: str = ".", sentences: int | None = None) -> str:
        """About `words` words ending like `end` (see `ending`), of `sentences` sentence ends if given.

        Cuts are at a sentence (or question) end, or after a word that ends no sentence when `end` is ""
        (or no end is within 3x `words`); a question wanted and none in reach: the nearest sentence end,
        asked. Without `sentences`, one random start and the cut nearest `words` (the best of several
        starts favours passages of short sentences, which a classifier told from organic text by
        sentences per word). With it, the best of 16 starts matching both counts, so a challenge copies
        the organic message's sentence length too."""
        words = max(1, words)
        best: tuple[tuple[bool, int], list[str]] | None = None
        for _ in range(1 if sentences is None else 16):
            start = rng.choice(self._starts)
            out = self._words[start : start + 3 * words + 2]
            found = 0
            for i, w in enumerate(out):
                found += w.endswith(_END)
                if not _is_cut(w, end):
                    continue
                cost = (sentences is not None and found != sentences, abs(i + 1 - words))
                if best is None or cost < best[0]:
                    best = (cost, out[: i + 1])
            if best is not None and best[0] == (False, 0):
                break
        if best is None and end == "?":
            return self.write(rng, words, ".", sentences).rstrip(".!") + "?"
        return " ".join(best[1] if best is not None else out)


def _is_cut(word: str, end: str) -> bool:
    if end == "":
        return not word.endswith(_END)
    return word.endswith("?" if end == "?" else (".", "!"))

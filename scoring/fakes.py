"""Deterministic stand-ins for a model, its tokenizer and a reference engine (unit tests, demos).

`BigramModel(seed)` is a toy language model whose next-token distribution depends only on the last
token; two seeds are two different "models". Tokens 2.. map to letters, 1 is EOS, 0 is BOS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from scoring.replay import NoisyArgmax, numpy_gumbel_argmax

EOS = 1
_FIRST_LETTER = 2


class LetterCodec:
    """Token i >= 2 <-> one letter; EOS (1) and BOS (0) decode to nothing."""

    eos_token_ids = frozenset({EOS})

    def __init__(self, vocab: int = 24) -> None:
        self.vocab = vocab

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def encode(self, text: str) -> list[int]:
        return [ord(ch) - ord("a") + _FIRST_LETTER for ch in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + t - _FIRST_LETTER) for t in token_ids if t >= _FIRST_LETTER)

    def encode_prompt(self, prompt: str) -> list[int]:
        """BOS + the letters of the prompt (anything else is dropped)."""
        return [
            0,
            *self.encode("".join(ch for ch in prompt.lower() if "a" <= ch < chr(ord("a") + self.vocab - 2))),
        ]

    def encode_chat(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
        return self.encode_prompt("".join(m["content"] for m in messages))

    def grammar(self) -> None:
        """Letters are no JSON: structured answers cannot be replayed over this codec."""
        return None

    def tool_parser(self, name: str) -> None:
        return None


class BigramModel:
    """logits[last, next] ~ N(0, scale^2), seeded; EOS gets a fixed bias so texts end sometimes."""

    def __init__(
        self,
        seed: int,
        vocab: int = 24,
        scale: float = 3.0,
        eos_bias: float = -2.0,
        noise: float = 0.0,
        noise_seed: int = 1234,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.logits = rng.normal(0.0, scale, size=(vocab, vocab))
        if noise:  # "perturbed weights": same model plus Gaussian noise
            self.logits = self.logits + np.random.default_rng(noise_seed).normal(
                0.0, noise, size=self.logits.shape
            )
        self.logits[:, 0] = -1e9  # never emit BOS
        self.logits[:, EOS] += eos_bias
        self.vocab = vocab

    def logprobs(self, last: int) -> np.ndarray:
        row = self.logits[last]
        return row - (row.max() + math.log(np.exp(row - row.max()).sum()))

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> tuple[list[int], str]:
        """(completion ids incl. a final EOS if it stopped, finish_reason). With a `seed`, sampling is
        Gumbel-max with `scoring.replay.numpy_gumbel_argmax`'s noise (so validators can replay it)."""
        rng = rng or np.random.default_rng(0)
        last = prompt_ids[-1] if prompt_ids else 0
        out: list[int] = []
        for step in range(max_tokens):
            lp = self.logprobs(last)
            if temperature == 0.0:
                tok = int(np.argmax(lp))
            elif seed is not None:
                tok = int(numpy_gumbel_argmax((lp / temperature)[None, :].astype(np.float32), seed, step)[0])
            else:
                p = np.exp(lp / temperature)
                tok = int(rng.choice(self.vocab, p=p / p.sum()))
            out.append(tok)
            if tok == EOS:
                return out, "stop"
            last = tok
        return out, "length"


class FakeReferenceEngine:
    """ReferenceEngine over a BigramModel; `jitter` adds per-call logit noise (nondeterminism)."""

    def __init__(
        self, model: BigramModel, jitter: float = 0.0, seed: int = 0, node_sampler: NoisyArgmax | None = None
    ) -> None:
        # node_sampler: what fake nodes sample with (numpy_gumbel_argmax when they honour seeds); None
        # tells a validator on node_sampler='auto' not to replay (unseeded fakes).
        self.node_sampler = node_sampler
        self.model = model
        self.jitter = jitter
        self._rng = np.random.default_rng(seed)
        self.calls = 0

    def prompt_logprobs(
        self, prompt_token_ids: Sequence[int], completion_token_ids: Sequence[int], top_k: int
    ) -> list[dict[int, float]]:
        self.calls += 1
        seq = list(prompt_token_ids) + list(completion_token_ids)
        out = []
        start = len(prompt_token_ids)
        for t in range(start, len(seq)):
            last = seq[t - 1] if t > 0 else 0
            lp = self.model.logprobs(last)
            if self.jitter:
                lp = lp + self._rng.normal(0.0, self.jitter, size=lp.shape)
            top = np.argsort(-lp)[:top_k]
            d = {int(i): float(lp[i]) for i in top}
            d[int(seq[t])] = float(lp[seq[t]])
            out.append(d)
        return out

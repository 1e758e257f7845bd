"""Challenge traffic that looks like organic traffic, and the shadow-verification sample.

* Content: each validator writes its own prompts (`scoring.organic.PromptWriter`, a Markov chain over
  text sources walked with the validator's private RNG, seeded from the OS and never shared; nothing
  of its output is stored), plus, only if `use_organic_prompts` is on (off by default: organic prompts
  may be private), a bounded ring of recently seen organic prompts.
* Shape: a whole request shape (kind, roles, words per message, temperature, top_p, max_tokens) copied
  from a recent organic request the validator saw on the shadow feed (`scoring.organic.OrganicMix`;
  a prior until then), so the parameters follow the organic mix jointly. Every challenge carries a
  random seed, as every request does after the gateway (so sampled challenges replay exactly).
* Timing: exponential inter-arrival per node (a Poisson process), so there is no schedule to learn.
* Shadow verification: the gateway offers a keyed-hash sample of verifiable organic requests (its
  `shadow_rate`, key unknown to nodes); a validator verifies each offered request after the fact
  with probability `shadow_rate` here (its own key), so behaving well only on challenges does not pay.
"""

from __future__ import annotations

import functools
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cluster.records import keyed_sample
from scoring.organic import OrganicMix, PromptWriter, RequestShape, corpus_text

SEED_BOUND = 2**63  # the gateway draws request seeds below this too (routing.gateway.SEED_BOUND)


@functools.lru_cache(maxsize=8)
def _writer(sources: tuple[str, ...]) -> PromptWriter:
    return PromptWriter.from_paths(sources) if sources else PromptWriter(corpus_text())


class ChallengeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_per_node_per_min: float = Field(
        default=0.5,
        gt=0,
        description="Mean challenges per node per minute per validator (exponential "
        "inter-arrival); 0.5 keeps 3 validators at ~2.5% of a node serving 1 organic request/s.",
    )
    text_sources: tuple[str, ...] = Field(
        default=(),
        description="Text files the prompt writer learns from; keep them private (empty: the default "
        "model's public tokenizer corpus, which a node could match n-grams against).",
    )
    mix_window: int = Field(
        default=512, ge=1, description="Recent organic request shapes the parameter mix draws from."
    )
    max_tokens_cap: int = Field(
        default=512,
        ge=1,
        description="Largest max_tokens a challenge asks for (organic shapes above it, or without a "
        "limit, are capped: bounds the load challenges put on nodes).",
    )
    max_prompt_words: int = Field(
        default=600,
        ge=1,
        description="Most words a challenge's messages hold together (a client can send any shape, and a "
        "challenge longer than the context would fail at the gateway and count against the node).",
    )
    stream_probability: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of streamed challenges when the copied shape does not say (the shadow feed "
        "does not carry `stream`).",
    )
    sampled: bool = Field(
        default=True,
        description="Keep the organic temperature (sampled challenges replay exactly through their seed); "
        "False makes every challenge greedy, which a node can see in the temperature.",
    )
    ask_token_ids: bool = Field(
        default=True,
        description="Ask the node for its token ids (vLLM's return_token_ids); without them the "
        "validator re-tokenises the text, which is weaker for non-canonical tokenisations.",
    )
    use_organic_prompts: bool = Field(
        default=False,
        description="Also replay recent organic prompts (privacy: off unless the deployment allows).",
    )
    organic_pool_size: int = Field(default=256, ge=1, description="Recent organic prompts kept when enabled.")
    organic_share: float = Field(
        default=0.5, ge=0, le=1, description="Share of challenges from organic prompts."
    )
    shadow_rate: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Probability this validator verifies an organic request the gateway "
        "offered for shadow verification (the gateway's own shadow_rate sets how many are offered).",
    )
    shadow_key: SecretStr = Field(
        default=SecretStr("meritnet-shadow"), description="Validator-private key of the shadow sampling hash."
    )


@dataclass(frozen=True, slots=True)
class ChallengeRequest:
    """One request a validator sends to one node through the gateway."""

    node_id: str
    model: str
    path: str  # "/v1/chat/completions" or "/v1/completions"
    body: dict[str, Any]
    prompt: str | None = None  # completions
    messages: tuple[dict[str, str], ...] | None = None  # chat

    @property
    def max_tokens(self) -> int | None:
        return int(self.body["max_tokens"]) if "max_tokens" in self.body else None

    @property
    def temperature(self) -> float:
        return float(self.body.get("temperature", 1.0))


class ChallengePool:
    """Draws challenge requests. Feed it what organic traffic looks like with `observe_shape` (parameters
    and lengths) and, only if enabled, organic prompts with `observe_organic`."""

    def __init__(self, config: ChallengeConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or ChallengeConfig()
        self.rng = rng or random.Random()  # seeded from the OS: the validator's private seed
        self.mix = OrganicMix(self.config.mix_window)
        self.writer = _writer(tuple(self.config.text_sources))
        self._organic: deque[str] = deque(maxlen=self.config.organic_pool_size)

    def observe_organic(self, prompt: str) -> None:
        if self.config.use_organic_prompts and prompt:
            self._organic.append(prompt)

    def observe_shape(self, shape: RequestShape) -> None:
        self.mix.observe(shape)

    def next_delay(self) -> float:
        """Seconds until the next challenge of one node (exponential with the configured mean)."""
        return self.rng.expovariate(self.config.rate_per_node_per_min / 60.0)

    def sample(self, node_id: str, model: str, replayable: bool = True) -> ChallengeRequest:
        """`replayable=False`: the validator cannot replay this model's seeded sampling, so the challenge
        is greedy (sampled output would only get the weak logprob floor), visibly so."""
        c, rng = self.config, self.rng
        shape = self.mix.draw(rng)
        messages = shape.messages()[-16:]  # the last turns of a long chat
        roles = [r for r, _, _, _ in messages]
        scale = min(1.0, c.max_prompt_words / max(1, sum(w for _, w, _, _ in messages)))
        texts = [  # a scaled-down message keeps its ending, not its sentence count
            self.writer.write(rng, int(w * scale), e, k if scale == 1 else None) for _, w, e, k in messages
        ]
        if self._organic and rng.random() < c.organic_share:  # replay: the last user turn / the prompt
            turns = [i for i, r in enumerate(roles) if r in ("user", "prompt")] or [len(texts) - 1]
            texts[turns[-1]] = rng.choice(list(self._organic))
        body: dict[str, Any] = {"model": model}
        body["max_tokens"] = min(shape.max_tokens or c.max_tokens_cap, c.max_tokens_cap)
        if not c.sampled or not replayable:
            body["temperature"] = 0.0
        elif shape.temperature is not None:
            body["temperature"] = shape.temperature
        if shape.top_p is not None:
            body["top_p"] = shape.top_p
        if shape.n != 1:
            body["n"] = shape.n
        body["seed"] = rng.randrange(SEED_BOUND)
        if shape.stream if shape.stream is not None else rng.random() < c.stream_probability:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if c.ask_token_ids:
            body["return_token_ids"] = True
        if shape.kind == "chat":
            messages = tuple({"role": r, "content": t} for r, t in zip(roles, texts))
            body["messages"] = [dict(m) for m in messages]
            return ChallengeRequest(node_id, model, "/v1/chat/completions", body, messages=messages)
        body["prompt"] = texts[0]
        return ChallengeRequest(node_id, model, "/v1/completions", body, prompt=texts[0])


class ShadowSampler:
    """Keyed-hash Bernoulli sample of organic request ids at `rate`."""

    def __init__(self, rate: float, key: str) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow rate must be in [0, 1], got {rate}")
        self.rate = rate
        self._key = key.encode()

    def should_verify(self, request_id: str) -> bool:
        return keyed_sample(self._key, request_id, self.rate)

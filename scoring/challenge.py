"""Challenge traffic that looks like organic traffic, and the shadow-verification sample.

* Prompts: a synthetic pool shipped in code (templates x topics x styles, a few thousand distinct
  prompts, drawn at random), plus, only if `use_organic_prompts` is on (off by default: organic prompts
  may be private), a bounded ring of recently seen organic prompts.
* Shape: the same OpenAI request bodies clients send (chat or completions, the same parameter ranges),
  so a node cannot tell a challenge by its form. Challenges are greedy by default because greedy
  outputs verify exactly (see scoring.verify); organic clients use temperature 0 too.
* Timing: exponential inter-arrival per node (a Poisson process), so there is no schedule to learn.
* Shadow verification: the gateway offers a keyed-hash sample of verifiable organic requests (its
  `shadow_rate`, key unknown to nodes); a validator verifies each offered request after the fact
  with probability `shadow_rate` here (its own key), so behaving well only on challenges does not pay.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cluster.records import keyed_sample

_TOPICS = (
    "the river town",
    "an old bridge",
    "the market",
    "a baker",
    "the harbour",
    "a long winter",
    "the school",
    "a quiet library",
    "the mountain road",
    "a small garden",
    "the night train",
    "a village festival",
    "the lighthouse",
    "a lost letter",
    "the orchard",
    "a rainy morning",
)
_TEMPLATES = (
    "Tell me about {t}.",
    "Write a short story about {t}.",
    "Describe {t} in a few sentences.",
    "What happened at {t}?",
    "Once upon a time, {t}",
    "The story of {t} begins",
    "Explain why people remember {t}.",
    "{T} was",
    "Give three facts about {t}.",
    "Continue: on the way to {t}, she",
    "Summarise a day at {t}.",
    "Write a poem about {t}.",
)
_STYLES = ("", " Keep it short.", " Be specific.", " Use simple words.", " Answer in one paragraph.")


class ChallengeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_per_node_per_min: float = Field(
        default=0.5,
        gt=0,
        description="Mean challenges per node per minute per validator (exponential "
        "inter-arrival); 0.5 keeps 3 validators at ~2.5% of a node serving 1 organic request/s.",
    )
    kinds: tuple[Literal["chat", "completion"], ...] = Field(
        default=("chat", "completion"), min_length=1, description="Request kinds to draw from."
    )
    max_tokens: tuple[int, ...] = Field(
        default=(16, 32, 48, 64),
        min_length=1,
        description="max_tokens values to draw from (like organic requests).",
    )
    temperatures: tuple[float, ...] = Field(
        default=(0.0,), min_length=1, description="Temperatures to draw from; 0 verifies most sharply."
    )
    stream_probability: float = Field(default=0.5, ge=0, le=1, description="Share of streamed challenges.")
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
    def max_tokens(self) -> int:
        return int(self.body["max_tokens"])

    @property
    def temperature(self) -> float:
        return float(self.body.get("temperature", 1.0))


def synthetic_prompt(rng: random.Random) -> str:
    topic = rng.choice(_TOPICS)
    text = rng.choice(_TEMPLATES).format(t=topic, T=topic[0].upper() + topic[1:])
    return text + rng.choice(_STYLES)


class ChallengePool:
    """Draws challenge requests; feed it organic prompts with `observe_organic` (kept only if enabled)."""

    def __init__(self, config: ChallengeConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or ChallengeConfig()
        self.rng = rng or random.Random()
        self._organic: deque[str] = deque(maxlen=self.config.organic_pool_size)

    def observe_organic(self, prompt: str) -> None:
        if self.config.use_organic_prompts and prompt:
            self._organic.append(prompt)

    def next_delay(self) -> float:
        """Seconds until the next challenge of one node (exponential with the configured mean)."""
        return self.rng.expovariate(self.config.rate_per_node_per_min / 60.0)

    def sample(self, node_id: str, model: str) -> ChallengeRequest:
        c, rng = self.config, self.rng
        use_organic = self._organic and rng.random() < c.organic_share
        text = rng.choice(list(self._organic)) if use_organic else synthetic_prompt(rng)
        kind = rng.choice(c.kinds)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": rng.choice(c.max_tokens),
            "temperature": rng.choice(c.temperatures),
        }
        if rng.random() < c.stream_probability:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if c.ask_token_ids:
            body["return_token_ids"] = True
        if kind == "chat":
            messages = ({"role": "user", "content": text},)
            body["messages"] = list(messages)
            return ChallengeRequest(node_id, model, "/v1/chat/completions", body, messages=messages)
        body["prompt"] = text
        return ChallengeRequest(node_id, model, "/v1/completions", body, prompt=text)


class ShadowSampler:
    """Keyed-hash Bernoulli sample of organic request ids at `rate`."""

    def __init__(self, rate: float, key: str) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow rate must be in [0, 1], got {rate}")
        self.rate = rate
        self._key = key.encode()

    def should_verify(self, request_id: str) -> bool:
        return keyed_sample(self._key, request_id, self.rate)

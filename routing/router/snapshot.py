"""The request's facts, one immutable snapshot per node, and the router's decision records.

A node's snapshot is the one validated way in: the Router builds every node's row of its
numpy Columns (what plugins read, columns.py) from a NodeSnapshot, and `Router.pick` takes
snapshots. These are slotted frozen dataclasses (cheaper to build than pydantic models, built
per request for RequestFacts) and strict: wrong types, NaN/infinity and out-of-range values
raise `ValueError` at construction, so a peer's bad report never reaches a plugin.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field


def _check_int(name: str, value: object, lo: int = 0) -> None:
    # bool is an int subclass; a True in_flight is a bug, not a count.
    if type(value) is not int or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_float(
    name: str, value: object, lo: float = 0.0, hi: float = math.inf, optional: bool = False
) -> None:
    if value is None and optional:
        return
    if type(value) not in (float, int) or not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the router may know about a request (never the request itself).

    `prompt_tokens` is an estimate (the gateway has not tokenised yet); `prefix_hash` keys
    session affinity; `session_key` (e.g. an `x-session-id` header) overrides it when set.
    `target_node` is set only for validator challenges that must hit one specific node.
    `prefix_blocks` are chained hashes of the prompt's leading blocks (block i's hash covers
    blocks 0..i, as vLLM's prefix cache keys its KV blocks), read by the `prefix-cache` scorer.
    `slo_ttft_s` is the client's time-to-first-token target (`x-slo-ttft-ms`), or None.
    `output_tokens` is the most the request may generate (its max_tokens x n), or None when it set no
    limit: latency predictions then use their plugin's `output_tokens` parameter.
    """

    model: str
    prompt_tokens: int = 0
    prefix_hash: str = ""
    session_key: str | None = None
    is_challenge: bool = False
    target_node: str | None = None
    prefix_blocks: tuple[int, ...] = ()
    slo_ttft_s: float | None = None
    output_tokens: int | None = None

    def __post_init__(self) -> None:
        if type(self.model) is not str or not self.model:
            raise ValueError(f"model must be a non-empty str, got {self.model!r}")
        _check_int("prompt_tokens", self.prompt_tokens)
        if type(self.prefix_hash) is not str:
            raise ValueError(f"prefix_hash must be a str, got {self.prefix_hash!r}")
        if self.session_key is not None and type(self.session_key) is not str:
            raise ValueError(f"session_key must be a str or None, got {self.session_key!r}")
        if type(self.is_challenge) is not bool:
            raise ValueError(f"is_challenge must be a bool, got {self.is_challenge!r}")
        if self.target_node is not None and type(self.target_node) is not str:
            raise ValueError(f"target_node must be a str or None, got {self.target_node!r}")
        if type(self.prefix_blocks) is not tuple or not all(type(b) is int for b in self.prefix_blocks):
            raise ValueError(f"prefix_blocks must be a tuple of ints, got {self.prefix_blocks!r}")
        _check_float("slo_ttft_s", self.slo_ttft_s, optional=True)
        if self.output_tokens is not None:
            _check_int("output_tokens", self.output_tokens)

    @classmethod
    def from_text(
        cls,
        model: str,
        text: str,
        session_key: str | None = None,
        is_challenge: bool = False,
        target_node: str | None = None,
        slo_ttft_s: float | None = None,
        output_tokens: int | None = None,
    ) -> RequestFacts:
        """Facts from the prompt text: ~4 characters per token, prefix = the first 256 characters,
        prefix blocks = chained hashes of the leading PREFIX_BLOCK_CHARS-character blocks.

        The gateway has the text, not token ids (it does not tokenise before routing), so blocks
        are fixed character spans (~16 tokens at ~4 characters per token) rather than vLLM's
        16-token blocks: two prompts sharing a system prompt share these leading blocks exactly
        as they share the node's KV blocks, up to where a block boundary splits differently.
        Python's hash() is salted per process, which is enough: each router keeps its own index.
        """
        prefix = hashlib.blake2b(text[:256].encode(), digest_size=8).hexdigest()
        blocks, h, step = [], 0, PREFIX_BLOCK_CHARS
        for start in range(0, min(len(text) // step, PREFIX_BLOCKS_MAX) * step, step):
            h = hash((h, text[start : start + step]))
            blocks.append(h)
        return cls(
            model,
            len(text) // 4,
            prefix,
            session_key,
            is_challenge,
            target_node,
            tuple(blocks),
            slo_ttft_s,
            output_tokens,
        )


PREFIX_BLOCK_CHARS = 64  # ~16 tokens, vLLM's block size
PREFIX_BLOCKS_MAX = 64  # hash at most the first ~4,096 characters: bounded work per request


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One candidate node as the router sees it at decision time (all times in seconds).

    `quality` is the validators' consensus score in [0,1], or None while the node is unscored
    (on probation). `banned_until` is 0.0 when not banned; `last_failure_at` is None if the node
    never failed. EWMAs are None until the first observation.
    """

    node_id: str
    model_id: str
    accelerator: str = ""
    capacity: int = 1
    live: bool = True
    in_flight: int = 0
    queue_depth: int = 0
    ttft_ewma_s: float | None = None
    tpot_ewma_s: float | None = None
    error_streak: int = 0
    banned_until: float = 0.0
    last_failure_at: float | None = None
    quality: float | None = None
    joined_at: float = 0.0
    _key: float = field(
        default=0.0, repr=False, compare=False
    )  # stable hash of node_id in (0,1), for affinity

    def __post_init__(self) -> None:
        if type(self.node_id) is not str or not self.node_id:
            raise ValueError(f"node_id must be a non-empty str, got {self.node_id!r}")
        if type(self.model_id) is not str or not self.model_id:
            raise ValueError(f"model_id must be a non-empty str, got {self.model_id!r}")
        if type(self.accelerator) is not str:
            raise ValueError(f"accelerator must be a str, got {self.accelerator!r}")
        _check_int("capacity", self.capacity, lo=1)
        if type(self.live) is not bool:
            raise ValueError(f"live must be a bool, got {self.live!r}")
        _check_int("in_flight", self.in_flight)
        _check_int("queue_depth", self.queue_depth)
        _check_float("ttft_ewma_s", self.ttft_ewma_s, optional=True)
        _check_float("tpot_ewma_s", self.tpot_ewma_s, optional=True)
        _check_int("error_streak", self.error_streak)
        _check_float("banned_until", self.banned_until)
        _check_float("last_failure_at", self.last_failure_at, optional=True)
        _check_float("quality", self.quality, hi=1.0, optional=True)
        _check_float("joined_at", self.joined_at)
        if self._key == 0.0:
            object.__setattr__(self, "_key", stable_hash(self.node_id))

    @property
    def load(self) -> float:
        """In-flight requests per unit of capacity (1.0 = every slot busy)."""
        return self.in_flight / self.capacity


def stable_hash(text: str) -> float:
    """A hash in (0,1) that is the same in every process (Python's hash() of a str is salted per
    process), so every gateway replica sends a session to the same node. 53 bits: a float."""
    bits = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 11
    return (bits | 1) / 9007199254740992.0  # 2**53


class NoEligibleNode(LookupError):
    """No candidate survived the profile's filters (or every candidate was excluded).

    `stage` names what emptied the list: the filter's name, "excluded" (every candidate was
    excluded by the caller, e.g. already tried) or "unregistered" (no node serves the model)."""

    def __init__(self, model: str, profile: str, reason: str, stage: str) -> None:
        super().__init__(
            f"no eligible node for model {model!r} (profile {profile!r}): {reason}. "
            "Check that nodes serving this model are registered and live, or wait for bans to expire."
        )
        self.model, self.profile, self.reason, self.stage = model, profile, reason, stage


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a decision came out as it did (only built when `explain=True`: it costs time).

    `removed` lists (filter name, node ids it removed) in order; `scores` maps each surviving
    node id to {scorer name: clamped raw score} plus "total" (the weighted, normalised sum);
    `timings_us` is the time each plugin took on this request.
    """

    removed: tuple[tuple[str, tuple[str, ...]], ...]
    scores: dict[str, dict[str, float]]
    timings_us: dict[str, float]


@dataclass(frozen=True, slots=True)
class Decision:
    """The router's choice: the node to call, its total score, and how many candidates it beat.
    `degraded` names the filters that would have refused the request and served their fallback instead."""

    node_id: str
    profile: str
    score: float
    candidates: int
    explanation: Explanation | None = None
    degraded: tuple[str, ...] = ()

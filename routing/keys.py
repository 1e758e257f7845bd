"""Client API keys: stored hashed, each with its own limits (the virtual keys users know from LiteLLM).

A key is shown once, when `meritnet keys create` makes it; the store (`keys.json` in the network's
state folder, mode 0600) holds only its SHA-256, an id that can be logged and metered, its limits
and whether it was revoked. The gateway re-reads the store when it changes, so a revocation takes
effect within a refresh (0.5 s) without a restart.

Limits are token buckets per key, refilled continuously: `requests_per_min` is checked when a
request arrives. `tokens_per_min` is reserved at admission (the request's prompt and all it may
generate: max_tokens x n, routing/metering.reservation) and settled to what it was billed when it
ends, however it ends (the difference is refunded), so concurrent requests cannot spend the same
tokens. A reservation larger than a minute's allowance holds the whole bucket (it needs a full one)
and its settlement may overdraw it; the next ones wait until it refills. A refusal is a 429 with
`Retry-After`: the seconds until the bucket has room again.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from routing import errors, metrics
from routing.budgets import Period

KEYS_FILE = "keys.json"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ClientKey(BaseModel):
    """One client key as stored: never the key itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str = Field(
        min_length=1, max_length=64, description="Public id: logged, metered, used to revoke."
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key.")
    requests_per_min: float | None = Field(default=None, gt=0, description="Request rate limit (None: none).")
    tokens_per_min: float | None = Field(default=None, gt=0, description="Token rate limit (None: none).")
    models: tuple[str, ...] | None = Field(default=None, description="Models it may use (None: all).")
    budget_tokens: int | None = Field(
        default=None, gt=0, description="Tokens it may spend per budget_period (None: no budget)."
    )
    budget_period: Period = Field(default="month", description="UTC day, week (from Monday) or month.")
    revoked: bool = Field(default=False, description="A revoked key is refused (401).")


def key_from_secret(secret: str, key_id: str | None = None) -> ClientKey:
    """A stored key for a secret given in config (`api_keys`), unlimited."""
    digest = hash_key(secret)
    return ClientKey(key_id=key_id or f"cfg-{digest[:8]}", sha256=digest)


class KeyStore:
    """The key file: create, revoke, list (the `meritnet keys` commands) and load (the gateway)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[ClientKey]:
        if not self.path.is_file():
            return []
        return [ClientKey.model_validate(k) for k in json.loads(self.path.read_text())]

    def _save(self, keys: Iterable[ClientKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([k.model_dump(mode="json") for k in keys], f, indent=1)
        os.replace(tmp, self.path)

    def create(
        self,
        requests_per_min: float | None = None,
        tokens_per_min: float | None = None,
        models: tuple[str, ...] | None = None,
        budget_tokens: int | None = None,
        budget_period: Period = "month",
    ) -> tuple[ClientKey, str]:
        """A new key: (what is stored, the secret to hand to the client once)."""
        secret = "mn-" + secrets.token_urlsafe(32)
        key = ClientKey(
            key_id="k-" + secrets.token_hex(4),
            sha256=hash_key(secret),
            requests_per_min=requests_per_min,
            tokens_per_min=tokens_per_min,
            models=models,
            budget_tokens=budget_tokens,
            budget_period=budget_period,
        )
        self._save([*self.load(), key])
        return key, secret

    def revoke(self, key_id: str) -> ClientKey:
        keys = self.load()
        match = [k for k in keys if k.key_id == key_id]
        if not match:
            raise KeyError(f"no key {key_id!r} in {self.path}; `meritnet keys list` shows the ids")
        self._save([k.model_copy(update={"revoked": True}) if k.key_id == key_id else k for k in keys])
        return match[0].model_copy(update={"revoked": True})


class _Bucket:
    __slots__ = ("at", "level")

    def __init__(self, capacity: float, now: float) -> None:
        self.level, self.at = capacity, now


class RateLimiter:
    """Token buckets per key (pure: the clock is injected). Capacity = one minute's allowance."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._held: dict[str, float] = {}  # request id -> tokens reserved for it

    def _level(self, key_id: str, kind: str, per_min: float) -> _Bucket:
        now = self.clock()
        b = self._buckets.get((key_id, kind))
        if b is None:
            b = self._buckets[(key_id, kind)] = _Bucket(per_min, now)
        b.level = min(per_min, b.level + (now - b.at) * per_min / 60.0)
        b.at = now
        return b

    def admit(self, key: ClientKey) -> float | None:
        """None if the request may go ahead (and takes one request from the bucket), else the seconds
        until it may (for Retry-After)."""
        waits = []
        if key.tokens_per_min is not None:
            b = self._level(key.key_id, "tokens", key.tokens_per_min)
            if b.level <= 0:
                waits.append((1 - b.level) * 60.0 / key.tokens_per_min)
        if key.requests_per_min is not None:
            b = self._level(key.key_id, "requests", key.requests_per_min)
            if b.level < 1:
                waits.append((1 - b.level) * 60.0 / key.requests_per_min)
            elif not waits:
                b.level -= 1
        return max(waits) if waits else None

    def reserve(self, key: ClientKey, request_id: str, tokens: int) -> float | None:
        """None if `tokens` (at most one minute's allowance) fit in the key's token bucket, which then
        holds them for `request_id` until `settle`; else the seconds until they fit (Retry-After)."""
        if key.tokens_per_min is None:
            return None
        hold = float(min(max(0, tokens), key.tokens_per_min))
        b = self._level(key.key_id, "tokens", key.tokens_per_min)
        if b.level < hold:
            return (hold - b.level) * 60.0 / key.tokens_per_min
        b.level -= hold
        self._held[request_id] = self._held.get(request_id, 0.0) + hold
        return None

    def settle(self, key: ClientKey, request_id: str, tokens: int) -> None:
        """Charge what `request_id` was billed in place of its reservation (the difference returns to
        the bucket, never beyond its capacity). Once per reservation: a request metered twice (a
        failed record write, then the audit record) is charged once."""
        held = self._held.pop(request_id, None)
        if key.tokens_per_min is None or held is None:
            return
        b = self._level(key.key_id, "tokens", key.tokens_per_min)
        b.level = min(key.tokens_per_min, b.level + held - max(0, tokens))

    def held(self) -> int:
        """Requests holding a reservation (what a test or a leak check reads)."""
        return len(self._held)


class KeyRing:
    """The keys a gateway accepts: those from config (hashed on load) and the key file (re-read when it
    changes), with their rate limiters. No keys at all means an open endpoint."""

    def __init__(
        self,
        config_keys: list[ClientKey],
        keys_file: Path | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config_keys, self._file = config_keys, keys_file
        self._by_hash: dict[str, ClientKey] = {}
        self._mtime: float | None = -1.0  # never equal to a real mtime or None: the first reload reads
        self.limiter = RateLimiter(clock)
        self.reload()

    def reload(self) -> None:
        """Re-read the key file if it changed (revocations take effect without a restart)."""
        mtime = self._file.stat().st_mtime if self._file is not None and self._file.is_file() else None
        if mtime == self._mtime:
            return
        stored = KeyStore(self._file).load() if mtime is not None else []
        self._by_hash = {k.sha256: k for k in [*self._config_keys, *stored]}
        self._mtime = mtime

    def authenticate(self, authorization: str) -> ClientKey | None:
        """The key of an `Authorization: Bearer ...` header; None when no keys are configured. A lookup
        by hash: nothing about how much of a key matched shows in the timing."""
        if not self._by_hash:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        key = self._by_hash.get(hash_key(token)) if scheme.lower() == "bearer" and token else None
        if key is None or key.revoked:
            raise errors.unauthorized()
        return key

    def admit(self, key: ClientKey | None, model: str) -> None:
        """The key's model allow-list (403) and rate limits (429 with Retry-After)."""
        if key is None:
            return
        if key.models is not None and model not in key.models:
            raise errors.APIError(
                403,
                f"This API key may not use model '{model}'.",
                param="model",
                type="permission_error",
                code="model_not_allowed",
            )
        wait = self.limiter.admit(key)
        if wait is not None:
            raise _rate_limited(key, wait)

    def reserve(self, key: ClientKey | None, request_id: str, tokens: int) -> None:
        """Hold `tokens` of the key's token limit for `request_id` (429 with Retry-After when they do
        not fit); every request that reserved must `settle`, however it ends."""
        if key is None:
            return
        wait = self.limiter.reserve(key, request_id, tokens)
        if wait is not None:
            raise _rate_limited(key, wait)

    def settle(self, key: ClientKey | None, request_id: str, tokens: int) -> None:
        """`request_id` ended having been billed `tokens` (0 when no node answered)."""
        if key is not None:
            self.limiter.settle(key, request_id, tokens)


def _rate_limited(key: ClientKey, wait: float) -> errors.APIError:
    metrics.KEY_REQUESTS.labels(key.key_id, "rate_limited").inc()
    return errors.APIError(
        429,
        f"Rate limit of API key {key.key_id} reached; retry in {wait:.1f} s.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after_s=wait,
    )

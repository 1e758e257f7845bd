"""The usage store: a Ray actor that makes gateways' usage records durable in settlement's ledger.

Group commit: records from concurrent requests that arrive while a write is in progress are
written together in the next transaction, so one fsync serves many requests and a gateway's
`await record(...)` returns only once its record is on disk.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Sequence

from cluster.records import UsageRecord

USAGE_STORE_NAME = "meritnet-usage"


class UsageStore:
    def __init__(self, path: str, epoch_length_s: float, genesis: float = 0.0) -> None:
        from settlement import UsageLedger

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._ledger = UsageLedger(path, epoch_length_s=epoch_length_s, genesis=genesis)
        self._pending: list[tuple[list[UsageRecord], asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self._opened_at = time.time()

    async def record(self, records: Sequence[UsageRecord]) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(records), fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            flat = [r for recs, _ in batch for r in recs]
            try:
                await asyncio.to_thread(self._ledger.append, flat)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def all(self, epoch: int | None = None) -> list[UsageRecord]:
        """Records of one epoch, or of every epoch since this store started (audits, tests)."""
        return await asyncio.to_thread(self._all, epoch)

    def _all(self, epoch: int | None) -> list[UsageRecord]:
        if epoch is not None:
            return list(self._ledger.records(epoch))
        first = self._ledger.epoch_of(self._opened_at)
        last = self._ledger.epoch_of(time.time()) + 1  # late records land in the next open epoch
        return [r for e in range(first, last + 1) for r in self._ledger.records(e)]


def start_usage_store(path: Path, epoch_length_s: float):
    import ray

    return (
        ray.remote(UsageStore)
        .options(name=USAGE_STORE_NAME, namespace="meritnet", get_if_exists=True, num_cpus=0,
                 max_concurrency=1000)
        .remote(str(path), epoch_length_s)
    )

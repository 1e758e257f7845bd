"""The one interface between metering producers (gateways) and consumers (settlement's ledger).

A sink's `record` returns only once the record is durable; the gateway awaits it before it
tells the client a request completed, so an acknowledged request always has its record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cluster.records import UsageRecord


class UsageSink(Protocol):
    async def record(self, records: Sequence[UsageRecord]) -> None:
        """Persist `records` durably; duplicates (same request id) must be ignored, not doubled."""
        ...


class MemoryUsageSink:
    """Non-durable sink for unit tests and demos without a ledger."""

    def __init__(self) -> None:
        self._records: dict[str, UsageRecord] = {}

    async def record(self, records: Sequence[UsageRecord]) -> None:
        for rec in records:
            self._records.setdefault(rec.request_id, rec)

    async def all(self) -> list[UsageRecord]:
        return list(self._records.values())

"""Off-chain settlement figures: ledger ingest rate and usage-tree build time.

    python -m benchmarks.settlement_offchain --out FILE.json [--quick]

`ledger_records_per_s`: cluster.UsageRecords appended to a fresh UsageLedger (WAL, synchronous=FULL,
so one fsync per batch) in batches of 5,000; records are built before the clock starts, so only
ingest (duplicate check, epoch assignment, insert, durable commit) is timed.
`merkle_build_s`: wall seconds of settlement.trees.usage_tree over a frozen epoch of N ok rows
(request-id hashing, leaf encoding and double hashing, sorting, all internal nodes), rows built
before the clock starts. `merkle_build_cpu_s` is the same run's process CPU time, which does not
grow when other work shares the machine. benchmarks.settlement calls the two measure_* functions.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from cluster import UsageRecord
from settlement.ledger import UsageLedger
from settlement.ledger_values import UsageRow
from settlement.trees import usage_tree

_OPERATORS = [
    "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4",
    "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2",
    "0x4B20993Bc481177ec7E8f571ceCaE8A9e22C02db",
    "0x78731D3Ca6b7E34aC0F824c42a7cC18A495cabaB",
]
_BATCH = 5_000
_last_cpu_s: float | None = None


def _records(n: int) -> list[UsageRecord]:
    return [
        UsageRecord(
            request_id=f"chatcmpl-{i:012d}",
            node_id=f"node-{i % 40}",
            operator=_OPERATORS[i % 40 % 4],
            model="default",
            prompt_tokens=20 + i % 500,
            completion_tokens=1 + i % 300,
            started_at=1_700_000_000.0 + i * 0.001,
            ttft_s=0.05,
            ended_at=1_700_000_000.5 + i * 0.001,
            status="ok" if i % 50 else "error",
            request_hash="ab" * 32,
            response_hash="cd" * 32,
        )
        for i in range(n)
    ]


def measure_ledger_records_per_s(n: int) -> float:
    """Records per second appended durably to a fresh ledger, in batches of 5,000."""
    records = _records(n)
    with (
        tempfile.TemporaryDirectory() as tmp,
        UsageLedger(Path(tmp) / "bench.db", epoch_length_s=3600.0, genesis=1_700_000_000.0) as ledger,
    ):
        start = time.perf_counter()
        for i in range(0, n, _BATCH):
            ledger.append(records[i : i + _BATCH])
        elapsed = time.perf_counter() - start
        assert ledger.count() == n, "benchmark ledger lost records"
    return n / elapsed


def measure_merkle_build_s(n_leaves: int) -> float:
    """Wall seconds to build the usage tree of an epoch with n_leaves ok interactions."""
    global _last_cpu_s
    rows = tuple(
        UsageRow(
            f"chatcmpl-{i:012d}",
            f"node-{i % 40}",
            _OPERATORS[i % 40 % 4],
            "default",
            20 + i % 500,
            1 + i % 300,
        )
        for i in range(n_leaves)
    )
    frozen = SimpleNamespace(epoch=12, rows=rows)
    cpu, start = time.process_time(), time.perf_counter()
    tree = usage_tree(frozen)
    elapsed = time.perf_counter() - start
    _last_cpu_s = time.process_time() - cpu
    assert len(tree) == n_leaves
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON output file")
    parser.add_argument("--quick", action="store_true", help="fewer ledger records (same keys)")
    args = parser.parse_args(argv)
    from rich.console import Console

    from settlement.merkle import KECCAK_BACKEND

    console = Console(stderr=True)
    result: dict = {"merkle_build_s": {}, "merkle_build_cpu_s": {}}
    n_records = 50_000 if args.quick else 200_000
    with console.status(f"ledger: appending {n_records} records"):
        result["ledger_records_per_s"] = round(measure_ledger_records_per_s(n_records))
    console.log(f"ledger: {result['ledger_records_per_s']} records/s")
    for n in (100_000, 1_000_000):
        with console.status(f"building a {n}-leaf usage tree"):
            result["merkle_build_s"][str(n)] = round(measure_merkle_build_s(n), 2)
            result["merkle_build_cpu_s"][str(n)] = round(_last_cpu_s or 0.0, 2)
        console.log(f"usage tree of {n} leaves: {result['merkle_build_s'][str(n)]} s")
    result["keccak_backend"] = KECCAK_BACKEND
    result["ledger_records"] = n_records
    result["machine"] = f"{platform.machine()}, {platform.python_version()}"
    result["quick"] = args.quick
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.log(json.dumps(result))


if __name__ == "__main__":
    main()

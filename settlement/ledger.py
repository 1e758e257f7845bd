"""The durable, append-only usage ledger and its epochs, on SQLite.

Durability: WAL journal with `synchronous=FULL`, so every commit fsyncs the WAL before
returning. `append` returns only after its transaction committed, which is what "acknowledged"
means: a record whose append returned survives kill -9 (and power loss, which NORMAL would not
guarantee in WAL mode: there a commit is only fsynced at the next checkpoint). One transaction and
one fsync per batch is what makes batched ingest fast.

Epochs (cluster.epochs): the epoch of a record is floor((ended_at - genesis) / epoch_length_s),
clamped at 0, fixed when the record is appended and stored with it. Epochs close strictly in order
(0, 1, 2, ...).
Closing freezes the epoch: its records, ordered by request_id, never change again.

Late records: a record whose natural epoch is already closed is assigned to the next open epoch
(last closed + 1) and counted in `AppendResult.late`. It is still paid, one epoch later, and the
frozen epoch (and the roots posted for it) stay untouched.

Only records with status "ok" earn rewards and get a usage leaf; error/cancelled records are kept
for audit (`records(epoch)`) but excluded from `FrozenEpoch.rows` and `usage_by_node`.

Besides records the ledger keeps the settlement actor's progress: settled epochs with their tx hash,
and the write-ahead signed transaction per epoch with the block at which it was first seen pending
(so a restart keeps counting towards its re-pricing). Rewards are not kept here: the RewardBook
beside the ledger owns them (`rewards()` reads it). Ledgers written before that still hold
epoch_rewards / operator_rewards tables; nothing reads them.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

from cluster import UsageRecord
from cluster.completions import MAX_COUNT
from cluster.epochs import Epochs
from settlement.ledger_values import (
    AppendResult,
    FrozenEpoch,
    LedgerError,
    PendingTx,
    UsageRow,
    group_by_node,
)
from settlement.rewards import NodeUsage
from settlement.trees import USAGE_LEAF_VERSION

__all__ = ["UsageLedger"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    request_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL,
    node_id TEXT NOT NULL, operator TEXT NOT NULL, model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    started_at REAL NOT NULL, ttft_s REAL, ended_at REAL NOT NULL, status TEXT NOT NULL,
    request_hash TEXT NOT NULL, response_hash TEXT NOT NULL, key_id TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_epoch ON records (epoch, request_id);
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY, closed_at REAL NOT NULL,
    n_records INTEGER NOT NULL, n_ok INTEGER NOT NULL, digest TEXT NOT NULL,
    leaf_version INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS settlements (epoch INTEGER PRIMARY KEY, tx_hash TEXT NOT NULL, settled_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pending_txs (
    epoch INTEGER PRIMARY KEY, raw_tx BLOB NOT NULL, nonce INTEGER NOT NULL, tx_hash TEXT NOT NULL,
    written_at REAL NOT NULL, pending_since_block INTEGER
);
"""
_FIELDS = (
    "node_id, operator, model, prompt_tokens, completion_tokens, started_at, ttft_s, ended_at, status, "
    "request_hash, response_hash, key_id"
)
_COLUMNS = "request_id, " + _FIELDS
_IN_CHUNK = 500  # bound parameters per duplicate lookup (SQLite's limit is 32766; small is fast too)
_PAGE = 10_000


def _counts_in_bounds(r: UsageRecord) -> bool:
    return all(type(n) is int and 0 <= n <= MAX_COUNT for n in (r.prompt_tokens, r.completion_tokens))


def _digest(rows: Sequence[tuple]) -> str:
    """sha256 over (request_id, status, node, operator, model, prompt, completion) lines (the body hashes
    after them are left out: epochs closed before leaves carried them keep their digest; the usage
    root on-chain commits the hashes)."""
    h = hashlib.sha256()
    for request_id, status, node_id, operator, model, prompt, completion, *_ in rows:
        h.update(
            f"{request_id}\x1f{status}\x1f{node_id}\x1f{operator}\x1f{model}\x1f{prompt}\x1f{completion}\n".encode()
        )
    return h.hexdigest()


class UsageLedger:
    """Append-only usage records with epochs, settlement status and the actor's write-ahead state.

    Safe to share between threads of one process (a lock serialises calls) and between processes
    on one host (SQLite locking; writers wait up to `busy_timeout_s`).
    """

    def __init__(
        self, path: str | Path, epoch_length_s: float, genesis: float = 0.0, busy_timeout_s: float = 30.0
    ) -> None:
        self.epochs = Epochs(float(genesis), float(epoch_length_s))  # validates both
        self.path = Path(path)
        self.epoch_length_s = self.epochs.length_s
        self.genesis = self.epochs.genesis
        self._lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None  # key_spent's, lock-free (WAL readers never wait)
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: see module doc
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(records)")}
        if "key_id" not in columns:  # a ledger written before records carried the client key's id
            self._conn.execute("ALTER TABLE records ADD COLUMN key_id TEXT NOT NULL DEFAULT ''")
        # a key's spend in a budget window (key_budget_spent): one index range per call
        self._conn.execute("CREATE INDEX IF NOT EXISTS records_by_key ON records (key_id, ended_at)")
        epoch_columns = {row[1] for row in self._conn.execute("PRAGMA table_info(epochs)")}
        if "leaf_version" not in epoch_columns:  # epochs closed before leaves had versions: version 1
            self._conn.execute("ALTER TABLE epochs ADD COLUMN leaf_version INTEGER NOT NULL DEFAULT 1")
        pending_columns = {row[1] for row in self._conn.execute("PRAGMA table_info(pending_txs)")}
        if "pending_since_block" not in pending_columns:  # written before re-pricing survived restarts
            self._conn.execute("ALTER TABLE pending_txs ADD COLUMN pending_since_block INTEGER")
        self._check_meta()

    @staticmethod
    def stored_settings(path: str | Path) -> tuple[float, float] | None:
        """(epoch_length_s, genesis) an existing ledger file was created with; None for a new file.
        Readers (audits, the CLI) open a ledger with these, so they never need to know them."""
        if not Path(path).is_file():
            return None
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            return None
        finally:
            conn.close()
        if "epoch_length_s" not in meta or "genesis" not in meta:
            return None
        return float(meta["epoch_length_s"]), float(meta["genesis"])

    def _check_meta(self) -> None:
        wanted = {"epoch_length_s": repr(self.epoch_length_s), "genesis": repr(self.genesis)}
        with self._write() as c:
            stored = dict(c.execute("SELECT key, value FROM meta").fetchall())
            for key, value in wanted.items():
                if key not in stored:
                    c.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
                elif stored[key] != value:
                    raise LedgerError(
                        f"ledger {self.path} was created with {key}={stored[key]}, not {value}: epochs of stored "
                        "records would change meaning; open it with the original value or use a new ledger file"
                    )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._reader is not None:
                self._reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transactions

    class _Txn:
        def __init__(self, ledger: UsageLedger) -> None:
            self.ledger = ledger

        def __enter__(self) -> sqlite3.Connection:
            self.ledger._lock.acquire()
            try:
                self.ledger._conn.execute("BEGIN IMMEDIATE")  # take the write lock before reading state
            except BaseException:
                self.ledger._lock.release()
                raise
            return self.ledger._conn

        def __exit__(self, exc_type: object, *rest: object) -> None:
            try:
                self.ledger._conn.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.ledger._lock.release()

    def _write(self) -> UsageLedger._Txn:
        return UsageLedger._Txn(self)

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------ epochs arithmetic

    def epoch_of(self, ended_at: float) -> int:
        """Natural epoch of a timestamp (before any late-record reassignment)."""
        return self.epochs.epoch_of(ended_at)

    def epoch_bounds(self, epoch: int) -> tuple[float, float]:
        return self.epochs.bounds(epoch)

    # ------------------------------------------------------------ records

    def append(self, records: Sequence[UsageRecord]) -> AppendResult:
        """Store a batch in one transaction; returns once it is durable.

        Request ids already stored, or repeated within the batch (after the first), are not
        stored again and are reported in `duplicates`.
        """
        for r in records:
            if not isinstance(r, UsageRecord):
                raise TypeError(f"UsageLedger.append takes cluster.UsageRecord items, got {type(r).__name__}")
        # A record built around validation (model_construct, an old pickled class) must not fail the
        # batch it came in, nor overflow an epoch's SUM() later: it is refused alone.
        rejected = tuple(r.request_id for r in records if not _counts_in_bounds(r))
        if rejected:
            records = [r for r in records if _counts_in_bounds(r)]
        if not records:
            return AppendResult(0, (), 0, rejected)
        with self._write() as c:
            last = c.execute("SELECT MAX(epoch) FROM epochs").fetchone()[0]
            first_open = 0 if last is None else last + 1
            by_id: dict[str, UsageRecord] = {}
            duplicates: list[str] = []
            for r in records:
                if r.request_id in by_id:
                    duplicates.append(r.request_id)
                else:
                    by_id[r.request_id] = r
            ids = list(by_id)
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                for (rid,) in c.execute(
                    f"SELECT request_id FROM records WHERE request_id IN ({marks})", chunk
                ):
                    duplicates.append(rid)
                    del by_id[rid]
            late = 0
            rows = []
            epoch_of = self.epochs.epoch_of
            for r in by_id.values():
                epoch = epoch_of(r.ended_at)
                if epoch < first_open:
                    epoch = first_open
                    late += 1
                rows.append(
                    (
                        r.request_id,
                        epoch,
                        r.node_id,
                        r.operator,
                        r.model,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.started_at,
                        r.ttft_s,
                        r.ended_at,
                        r.status,
                        r.request_hash,
                        r.response_hash,
                        r.key_id,
                    )
                )
            c.executemany(
                f"INSERT INTO records (request_id, epoch, {_FIELDS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return AppendResult(len(rows), tuple(duplicates), late, rejected)

    def records(self, epoch: int) -> Iterator[UsageRecord]:
        """Every record of an epoch (all statuses) in request_id order, read page by page."""
        after = ""
        while True:
            page = self._read(
                f"SELECT {_COLUMNS} FROM records WHERE epoch = ? AND request_id > ? "
                "ORDER BY request_id LIMIT ?",
                (epoch, after, _PAGE),
            )
            for row in page:
                yield UsageRecord(**dict(zip(_COLUMNS.split(", "), row, strict=True)))
            if len(page) < _PAGE:
                return
            after = page[-1][0]

    def find(self, request_id: str) -> tuple[int, UsageRecord] | None:
        """(its epoch, the record) of one request id, or None if the ledger never took it."""
        rows = self._read(f"SELECT epoch, {_COLUMNS} FROM records WHERE request_id = ?", (request_id,))
        if not rows:
            return None
        epoch, *row = rows[0]
        return epoch, UsageRecord(**dict(zip(_COLUMNS.split(", "), row, strict=True)))

    def key_spent(self, key_id: str, since: float) -> int:
        """Tokens charged to client key `key_id` by requests that ended at or after `since` (unix time):
        prompt + completion the gateway counted, whatever the request's end (a client that leaves after
        its last token is charged what it got, as its token-per-minute limit is). Read on a connection of
        its own without the writers' lock: under WAL a read never waits for a write, so the usage store
        can call this on its event loop."""
        if self._reader is None:
            self._reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        row = self._reader.execute(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM records WHERE key_id = ? AND ended_at >= ?",
            (key_id, since),
        ).fetchone()
        return int(row[0])

    def epochs_with_records(self) -> list[int]:
        """The epochs that hold records, in order."""
        return [row[0] for row in self._read("SELECT DISTINCT epoch FROM records ORDER BY epoch")]

    def count(self, epoch: int | None = None) -> int:
        """Number of stored records (of one epoch, or all)."""
        if epoch is None:
            return self._read("SELECT COUNT(*) FROM records")[0][0]
        return self._read("SELECT COUNT(*) FROM records WHERE epoch = ?", (epoch,))[0][0]

    def usage_by_node(self, epoch: int) -> dict[str, tuple[NodeUsage, ...]]:
        """Ok tokens per node, one NodeUsage per operator (final once the epoch is closed)."""
        rows = self._read(
            "SELECT node_id, operator, SUM(prompt_tokens), SUM(completion_tokens) FROM records "
            "WHERE epoch = ? AND status = 'ok' GROUP BY node_id, operator",
            (epoch,),
        )
        return group_by_node(rows)

    # ------------------------------------------------------------ freezing

    def last_closed_epoch(self) -> int | None:
        return self._read("SELECT MAX(epoch) FROM epochs")[0][0]

    def close_epoch(self, epoch: int) -> FrozenEpoch:
        """Freeze `epoch` (the next one in order); closing an already closed epoch returns it unchanged."""
        with self._write() as c:
            if c.execute("SELECT 1 FROM epochs WHERE epoch = ?", (epoch,)).fetchone() is None:
                last = c.execute("SELECT MAX(epoch) FROM epochs").fetchone()[0]
                expected = 0 if last is None else last + 1
                if epoch != expected:
                    raise LedgerError(
                        f"epochs close in order: the next epoch to close is {expected}, not {epoch}"
                    )
                all_rows = self._epoch_rows(c, epoch)
                n_ok = sum(1 for r in all_rows if r[1] == "ok")
                c.execute(
                    "INSERT INTO epochs (epoch, closed_at, n_records, n_ok, digest, leaf_version) "
                    "VALUES (?,?,?,?,?,?)",
                    (epoch, time.time(), len(all_rows), n_ok, _digest(all_rows), USAGE_LEAF_VERSION),
                )
        return self.frozen_epoch(epoch)

    @staticmethod
    def _epoch_rows(c: sqlite3.Connection, epoch: int) -> list[tuple]:
        return c.execute(
            "SELECT request_id, status, node_id, operator, model, prompt_tokens, completion_tokens, "
            "request_hash, response_hash FROM records WHERE epoch = ? ORDER BY request_id",
            (epoch,),
        ).fetchall()

    def frozen_epoch(self, epoch: int) -> FrozenEpoch:
        """A closed epoch, re-read and checked against the digest taken when it closed."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN")  # one snapshot for the epoch row and its records
            try:
                meta = c.execute(
                    "SELECT closed_at, n_records, digest, leaf_version FROM epochs WHERE epoch = ?", (epoch,)
                ).fetchone()
                all_rows = self._epoch_rows(c, epoch) if meta else []
            finally:
                c.execute("COMMIT")
        if meta is None:
            raise LedgerError(f"epoch {epoch} is not closed yet; close it with close_epoch({epoch}) first")
        closed_at, n_records, digest, leaf_version = meta
        if len(all_rows) != n_records or _digest(all_rows) != digest:
            raise LedgerError(
                f"frozen epoch {epoch} no longer matches its digest: the ledger file was altered"
            )
        start, end = self.epoch_bounds(epoch)
        rows = tuple(UsageRow(r[0], *r[2:]) for r in all_rows if r[1] == "ok")
        return FrozenEpoch(epoch, start, end, closed_at, n_records, digest, rows, leaf_version)

    # ------------------------------------------------------------ settlement state

    def mark_settled(self, epoch: int, tx_hash: str) -> None:
        """Record the epoch as settled on-chain by `tx_hash`, and drop its pending tx (one transaction).

        Idempotent for the same hash; a different hash for a settled epoch is refused.
        """
        with self._write() as c:
            if c.execute("SELECT 1 FROM epochs WHERE epoch = ?", (epoch,)).fetchone() is None:
                raise LedgerError(f"cannot mark epoch {epoch} settled: it is not closed in this ledger")
            row = c.execute("SELECT tx_hash FROM settlements WHERE epoch = ?", (epoch,)).fetchone()
            if row is not None and row[0] != tx_hash:
                raise LedgerError(
                    f"epoch {epoch} is already settled by {row[0]}; refusing to record {tx_hash}"
                )
            if row is None:
                c.execute(
                    "INSERT INTO settlements (epoch, tx_hash, settled_at) VALUES (?,?,?)",
                    (epoch, tx_hash, time.time()),
                )
            c.execute("DELETE FROM pending_txs WHERE epoch = ?", (epoch,))

    def settled(self, epoch: int) -> str | None:
        """The tx hash that settled `epoch`, or None when it is not settled."""
        rows = self._read("SELECT tx_hash FROM settlements WHERE epoch = ?", (epoch,))
        return rows[0][0] if rows else None

    def last_settled_epoch(self) -> int | None:
        return self._read("SELECT MAX(epoch) FROM settlements")[0][0]

    def put_pending_tx(self, epoch: int, raw_tx: bytes, nonce: int, tx_hash: str) -> None:
        """Write ahead the signed tx for `epoch` (replacing an earlier one, e.g. re-signed with bumped
        fees; a replacement starts its own pending count)."""
        with self._write() as c:
            c.execute(
                "INSERT OR REPLACE INTO pending_txs (epoch, raw_tx, nonce, tx_hash, written_at, "
                "pending_since_block) VALUES (?,?,?,?,?,NULL)",
                (epoch, bytes(raw_tx), nonce, tx_hash, time.time()),
            )

    def pending_tx(self, epoch: int) -> PendingTx | None:
        rows = self._read("SELECT raw_tx, nonce, tx_hash FROM pending_txs WHERE epoch = ?", (epoch,))
        return PendingTx(bytes(rows[0][0]), rows[0][1], rows[0][2]) if rows else None

    def pending_since(self, epoch: int, tx_hash: str, block: int) -> int:
        """The block at which `epoch`'s written-ahead tx `tx_hash` was first seen pending: `block` the
        first time it is asked (stored), the stored block after that, across restarts. A hash that is
        not the epoch's pending tx is not stored (returns `block`)."""
        with self._write() as c:
            c.execute(
                "UPDATE pending_txs SET pending_since_block = ? WHERE epoch = ? AND tx_hash = ? "
                "AND pending_since_block IS NULL",
                (block, epoch, tx_hash),
            )
            row = c.execute(
                "SELECT pending_since_block FROM pending_txs WHERE epoch = ? AND tx_hash = ?",
                (epoch, tx_hash),
            ).fetchone()
        return block if row is None else row[0]

    def clear_pending_tx(self, epoch: int) -> None:
        with self._write() as c:
            c.execute("DELETE FROM pending_txs WHERE epoch = ?", (epoch,))

    # ------------------------------------------------------------ rewards (read from their owner)

    def rewards(self, epoch: int) -> tuple[dict[str, int], int] | None:
        """(wei per operator, carried wei) committed for `epoch`, or None: read from the RewardBook
        beside this ledger (`settlement.rewardbook`), which owns reward state. For audits and tests
        that hold only the ledger's path; validators' amounts are in the book's commitment."""
        from settlement.rewardbook import RewardBook, book_path_of

        path = book_path_of(self.path)
        if not path.is_file():
            return None
        book = RewardBook(path)
        try:
            c = book.get(epoch)
        finally:
            book.close()
        return None if c is None else (dict(c.operator_rewards), c.carried_wei)

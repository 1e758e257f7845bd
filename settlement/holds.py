"""Key budget holds on disk, beside the usage ledger: a restarted usage store still counts the holds of
requests that were running when its predecessor died.

A hold is a request's worst case (prompt + max_tokens x n), held against its key's budget from
admission until its record is in the ledger (deploy/usage.py `UsageStore`). Writes go to SQLite in WAL
mode with `synchronous=NORMAL`: a commit is in the OS's page cache when it returns (the WAL is synced
at checkpoints only), so it survives the store's process dying, which is what restarts the store; a
power loss may lose the last holds, and those requests are then charged when they end but not counted
meanwhile. Holds are short-lived (a request's deadline + 60 s): nothing more is worth an fsync on the
admission path.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("meritnet.holds")


@dataclass(frozen=True, slots=True)
class Hold:
    key_id: str
    tokens: int
    expires_at: float  # unix time


class HoldBook:
    """The holds table: put when held, drop when charged or released, load at a store's start. Best
    effort: a failing disk never fails a request or the store (the error is logged; holds stay in the
    store's memory), and an unreadable file is set aside and started afresh."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        try:
            self._conn: sqlite3.Connection | None = self._open()
        except sqlite3.Error as exc:
            log.warning("key budget holds file %s unreadable (%s): set aside, starting empty", path, exc)
            try:
                self._path.replace(self._path.with_name(self._path.name + ".unreadable"))
                self._conn = self._open()
            except (OSError, sqlite3.Error) as again:
                log.warning("key budget holds are kept in memory only (%s)", type(again).__name__)
                self._conn = None

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS holds (request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, "
            "tokens INTEGER NOT NULL, expires_at REAL NOT NULL)"
        )
        return conn

    def _run(self, sql: str, rows: list[tuple]) -> None:
        if self._conn is None or not rows:
            return
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            log.warning("could not write key budget holds (%s); they stay in memory", exc)

    def put(self, request_id: str, hold: Hold) -> None:
        self._run(
            "INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?)",
            [(request_id, hold.key_id, hold.tokens, hold.expires_at)],
        )

    def drop(self, request_ids: Iterable[str]) -> None:
        self._run("DELETE FROM holds WHERE request_id = ?", [(rid,) for rid in request_ids])

    def load(self, now: float, charged: Callable[[str], bool]) -> dict[str, Hold]:
        """The holds still in force: not expired, and whose request has no record yet (`charged`: the
        ledger has it; its hold was left behind when the store died between the two writes)."""
        if self._conn is None:
            return {}
        try:
            rows = self._conn.execute("SELECT request_id, key_id, tokens, expires_at FROM holds").fetchall()
        except sqlite3.Error as exc:
            log.warning("could not read key budget holds (%s); starting without them", exc)
            return {}
        live = {
            rid: Hold(key, tokens, exp) for rid, key, tokens, exp in rows if exp >= now and not charged(rid)
        }
        self.drop(rid for rid, *_ in rows if rid not in live)
        return live

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

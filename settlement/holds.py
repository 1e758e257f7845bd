"""Key budget holds on disk, beside the usage ledger: a restarted usage store still counts the holds of
requests that were running when its predecessor died.

A hold is a request's worst case (prompt + max_tokens x n), held against its key's budget from
admission until its record is in the ledger (deploy/usage.py `UsageStore`). Writes go to SQLite in WAL
mode with `synchronous=NORMAL`: a commit is in the OS's page cache when it returns (no fsync), so it
survives the store's process dying, which is what restarts the store; a power loss may lose the last
holds, and those requests are then charged when they end but not counted meanwhile. Holds are short-
lived (a request's deadline + 60 s), so nothing more is worth an fsync on the admission path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Hold:
    key_id: str
    tokens: int
    expires_at: float  # unix time


class HoldBook:
    """The holds table: put when held, drop when charged or released, load at a store's start."""

    def __init__(self, path: str | Path) -> None:
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS holds (request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, "
            "tokens INTEGER NOT NULL, expires_at REAL NOT NULL)"
        )

    def put(self, request_id: str, hold: Hold) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?)",
            (request_id, hold.key_id, hold.tokens, hold.expires_at),
        )

    def drop(self, request_ids: Iterable[str]) -> None:
        ids = [(rid,) for rid in request_ids]
        if ids:
            self._conn.executemany("DELETE FROM holds WHERE request_id = ?", ids)

    def load(self, now: float, charged: Callable[[str], bool]) -> dict[str, Hold]:
        """The holds still in force: not expired, and whose request has no record yet (`charged`: the
        ledger has it; its hold was left behind when the store died between the two writes)."""
        rows = self._conn.execute("SELECT request_id, key_id, tokens, expires_at FROM holds").fetchall()
        live = {
            rid: Hold(key, tokens, exp) for rid, key, tokens, exp in rows if exp >= now and not charged(rid)
        }
        self.drop(rid for rid, *_ in rows if rid not in live)
        return live

    def close(self) -> None:
        self._conn.close()

"""What each epoch committed to: its roots, totals and every operator's cumulative reward.

Written once per epoch, before the settle transaction is signed, so a restart re-sends exactly
what was computed (quality scores that arrive later cannot change a committed epoch), and the next
epoch's cumulative amounts build on what was actually posted. The claim tools read it to export
the reward tree and prove an operator's amount. SQLite (WAL) in its own file beside the ledger;
amounts are stored as decimal text because uint256 does not fit SQLite's 64-bit integers.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EpochCommitment:
    """One epoch as posted on-chain."""

    epoch: int
    usage_root: bytes
    reward_root: bytes
    interactions: int
    epoch_reward: int  # wei paid out this epoch (emission + carry-in, or 0 when carried on)
    carried_wei: int  # wei carried to the next epoch (no eligible usage)
    cumulative: dict[str, int] = field(default_factory=dict)  # operator -> cumulative wei through this epoch


class RewardBook:
    """Append-only store of EpochCommitments and of the quality scores each epoch used."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS commitments (epoch INTEGER PRIMARY KEY, usage_root BLOB NOT NULL, "
            "reward_root BLOB NOT NULL, interactions INTEGER NOT NULL, epoch_reward TEXT NOT NULL, "
            "carried_wei TEXT NOT NULL, cumulative TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS quality (epoch INTEGER PRIMARY KEY, scores TEXT NOT NULL)"
        )

    def put(self, c: EpochCommitment) -> EpochCommitment:
        """Store the epoch's commitment; an existing one wins (it may already be on-chain)."""
        cumulative = json.dumps({k: str(v) for k, v in sorted(c.cumulative.items())})
        self._db.execute(
            "INSERT OR IGNORE INTO commitments VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                c.epoch,
                c.usage_root,
                c.reward_root,
                c.interactions,
                str(c.epoch_reward),
                str(c.carried_wei),
                cumulative,
            ),
        )
        stored = self.get(c.epoch)
        assert stored is not None
        return stored

    def get(self, epoch: int) -> EpochCommitment | None:
        row = self._db.execute("SELECT * FROM commitments WHERE epoch = ?", (epoch,)).fetchone()
        if row is None:
            return None
        return EpochCommitment(
            epoch=row[0],
            usage_root=bytes(row[1]),
            reward_root=bytes(row[2]),
            interactions=row[3],
            epoch_reward=int(row[4]),
            carried_wei=int(row[5]),
            cumulative={k: int(v) for k, v in json.loads(row[6]).items()},
        )

    def latest(self) -> EpochCommitment | None:
        row = self._db.execute("SELECT MAX(epoch) FROM commitments").fetchone()
        return None if row[0] is None else self.get(row[0])

    def put_quality(self, epoch: int, scores: dict[str, float]) -> None:
        """Record the scores for an epoch (replaced until the epoch is committed)."""
        self._db.execute(
            "INSERT OR REPLACE INTO quality VALUES (?, ?)", (epoch, json.dumps(scores, sort_keys=True))
        )

    def quality(self, epoch: int) -> dict[str, float] | None:
        row = self._db.execute("SELECT scores FROM quality WHERE epoch = ?", (epoch,)).fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        self._db.close()

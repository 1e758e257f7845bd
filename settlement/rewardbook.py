"""The one owner of reward state: what each epoch paid, to whom, and the scores it used.

Per epoch it keeps the quality (node -> [0, 1]) and the validators' dividends (address -> share)
consensus submitted, then, once, the commitment: both roots, the wei paid to each operator and each
validator this epoch, the wei carried on, and every account's cumulative amount (the reward tree's
leaves). A commitment is written in one SQLite transaction before the settle tx is signed, so a
restart re-sends exactly what was computed and scores that arrive later cannot change it. Nothing
else stores rewards: the ledger keeps usage and settlement progress (settled epochs, pending txs)
and reads rewards from here (`UsageLedger.rewards`).

SQLite (WAL, synchronous=FULL) in its own file beside the ledger (`book_path_of`); amounts are
decimal text because uint256 does not fit SQLite's 64-bit integers.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path


def book_path_of(ledger_path: Path | str) -> Path:
    """Where the RewardBook of a ledger lives: beside it."""
    return Path(str(ledger_path) + ".rewards.sqlite")


@dataclass(frozen=True)
class EpochCommitment:
    """One epoch as posted on-chain."""

    epoch: int
    usage_root: bytes
    reward_root: bytes
    interactions: int
    epoch_reward: int  # wei paid out this epoch (operators + validators)
    carried_wei: int  # wei carried to the next epoch (no eligible usage, or above the cap)
    cumulative: dict[str, int] = field(default_factory=dict)  # address -> cumulative wei through this epoch
    operator_rewards: dict[str, int] = field(default_factory=dict)  # operator -> wei this epoch
    validator_rewards: dict[str, int] = field(default_factory=dict)  # validator address -> wei this epoch


def _amounts(d: dict[str, int]) -> str:
    return json.dumps({k: str(v) for k, v in sorted(d.items())})


class RewardBook:
    """Append-only store of EpochCommitments and of the scores each epoch used."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS commitments (epoch INTEGER PRIMARY KEY, usage_root BLOB NOT NULL, "
            "reward_root BLOB NOT NULL, interactions INTEGER NOT NULL, epoch_reward TEXT NOT NULL, "
            "carried_wei TEXT NOT NULL, cumulative TEXT NOT NULL, operators TEXT, validators TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(commitments)")}
        for column in ("operators", "validators"):  # a book written before validators were paid
            if column not in columns:
                self._db.execute(f"ALTER TABLE commitments ADD COLUMN {column} TEXT")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS quality (epoch INTEGER PRIMARY KEY, scores TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS dividends (epoch INTEGER PRIMARY KEY, shares TEXT NOT NULL)"
        )

    @classmethod
    def beside(cls, ledger_path: Path | str) -> RewardBook:
        return cls(book_path_of(ledger_path))

    def put(self, c: EpochCommitment) -> EpochCommitment:
        """Store the epoch's commitment; an existing one wins (it may already be on-chain)."""
        self._db.execute(
            "INSERT OR IGNORE INTO commitments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                c.epoch,
                c.usage_root,
                c.reward_root,
                c.interactions,
                str(c.epoch_reward),
                str(c.carried_wei),
                _amounts(c.cumulative),
                _amounts(c.operator_rewards),
                _amounts(c.validator_rewards),
            ),
        )
        stored = self.get(c.epoch)
        assert stored is not None
        return stored

    def get(self, epoch: int) -> EpochCommitment | None:
        row = self._db.execute("SELECT * FROM commitments WHERE epoch = ?", (epoch,)).fetchone()
        if row is None:
            return None
        cumulative = {k: int(v) for k, v in json.loads(row[6]).items()}
        if row[7] is None:  # written before per-epoch amounts were kept: the cumulative difference
            before = self.get(epoch - 1)
            previous = before.cumulative if before else {}
            operators = {k: v - previous.get(k, 0) for k, v in cumulative.items() if v > previous.get(k, 0)}
        else:
            operators = {k: int(v) for k, v in json.loads(row[7]).items()}
        return EpochCommitment(
            epoch=row[0],
            usage_root=bytes(row[1]),
            reward_root=bytes(row[2]),
            interactions=row[3],
            epoch_reward=int(row[4]),
            carried_wei=int(row[5]),
            cumulative=cumulative,
            operator_rewards=operators,
            validator_rewards={k: int(v) for k, v in json.loads(row[8] or "{}").items()},
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

    def put_dividends(self, epoch: int, shares: dict[str, float]) -> None:
        """Record the validators' dividends (address -> share) for an epoch (replaced until committed)."""
        self._db.execute(
            "INSERT OR REPLACE INTO dividends VALUES (?, ?)", (epoch, json.dumps(shares, sort_keys=True))
        )

    def dividends(self, epoch: int) -> dict[str, float] | None:
        row = self._db.execute("SELECT shares FROM dividends WHERE epoch = ?", (epoch,)).fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        self._db.close()

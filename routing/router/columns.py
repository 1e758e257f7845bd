"""The router's one representation of a set of nodes: row-aligned numpy columns.

Every plugin reads these columns (row i = the i-th node), whatever the fleet size: one numpy
operation over 64 or 1000 floats costs about the same ~1-2 us on the 2-core test machine, while a
Python pass costs ~4 us per 64 nodes and ~80 us per 1000. The Router keeps one Columns per model
and writes a row whenever one of its inputs changes; `Router.pick` builds one from snapshots.

Columns also carry the framework's precomputed state (`cache`): results of plugins that depend
only on some columns (e.g. the live and quality-floor filters, the quality scorer). Each column
has a version, bumped by every write through `set` / `add`; a cached result is keyed by the
versions of the columns it read, so any change to them (quality, bans, liveness, load) makes the
next decision recompute it. Write the arrays only through `set` / `add`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from routing.router.snapshot import NodeSnapshot

_NAN = math.nan

# Column name -> how a NodeSnapshot field becomes a float (None -> NaN, or 0.0 for last_failure_at,
# which the not-banned filter treats as "never failed").
FLOATS = (
    "capacity",
    "in_flight",
    "queue_depth",
    "ttft",
    "tpot",
    "error_streak",
    "banned_until",
    "last_failure_at",
    "quality",
    "joined_at",
    "key",
)
COLUMNS = ("model", "live", *FLOATS)


def row_values(s: NodeSnapshot) -> dict[str, object]:
    """One snapshot's values by column name."""
    return {
        "model": s.model_id,
        "live": s.live,
        "capacity": float(s.capacity),
        "in_flight": float(s.in_flight),
        "queue_depth": float(s.queue_depth),
        "ttft": _NAN if s.ttft_ewma_s is None else s.ttft_ewma_s,
        "tpot": _NAN if s.tpot_ewma_s is None else s.tpot_ewma_s,
        "error_streak": float(s.error_streak),
        "banned_until": s.banned_until,
        "last_failure_at": 0.0 if s.last_failure_at is None else s.last_failure_at,
        "quality": _NAN if s.quality is None else s.quality,
        "joined_at": s.joined_at,
        "key": s._key,
    }


class Columns:
    """Row-aligned arrays of some nodes' snapshots, with per-column versions and a result cache."""

    def __init__(self, snaps: Sequence[NodeSnapshot]) -> None:
        self.ids = [s.node_id for s in snaps]
        self.pos = {nid: i for i, nid in enumerate(self.ids)}
        if len(self.pos) != len(self.ids):
            raise ValueError("node ids must be unique")
        self.size = len(snaps)
        self.accelerator = [s.accelerator for s in snaps]
        self.model = np.array([s.model_id for s in snaps], dtype=object)
        self.live = np.array([s.live for s in snaps], dtype=bool)
        rows = [row_values(s) for s in snaps]
        for name in FLOATS:
            setattr(self, name, np.array([r[name] for r in rows], dtype=np.float64))
        self.versions = dict.fromkeys(COLUMNS, 0)
        self.cache: dict = {}
        self.all_rows = np.ones(self.size, dtype=bool)

    def set(self, name: str, row: int, value: object) -> None:
        """Write one cell; bumps the column's version only when the value changes."""
        col = getattr(self, name)
        old = col[row]
        if old == value or (old != old and value != value):  # equal, or both NaN
            return
        col[row] = value
        self.versions[name] += 1

    def set_row(self, row: int, s: NodeSnapshot) -> None:
        """Write every column of one row from a snapshot (same id)."""
        for name, value in row_values(s).items():
            self.set(name, row, value)

    def add(self, name: str, row: int, delta: float) -> None:
        """Add to one cell (the hot path: in-flight counts on every request start and end)."""
        getattr(self, name)[row] += delta
        self.versions[name] += 1

    def versions_of(self, reads: tuple[str, ...]) -> tuple[int, ...]:
        """The versions of `reads`: a cached result computed from them is valid while this is equal."""
        v = self.versions
        return tuple([v[r] for r in reads])

    def memo(self, name: object, reads: tuple[str, ...], compute):
        """`compute()` cached under `name` until a column in `reads` changes (for plugins' static parts)."""
        key = (name, self.versions_of(reads))
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = compute()
        return hit

    def mask(self, exclude: frozenset[str] | set[str] = frozenset()) -> np.ndarray:
        """Boolean row mask of every node except those in `exclude`."""
        drop = [self.pos[e] for e in exclude if e in self.pos]
        if not drop:
            return self.all_rows.copy()
        m = self.all_rows.copy()
        m[drop] = False
        return m

    def snapshot(self, row: int) -> NodeSnapshot:
        """Row `row` as a (validated) NodeSnapshot (a last_failure_at of 0.0 reads back as None)."""

        def opt(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        last = float(self.last_failure_at[row])
        return NodeSnapshot(
            node_id=self.ids[row],
            model_id=str(self.model[row]),
            accelerator=self.accelerator[row],
            capacity=int(self.capacity[row]),
            live=bool(self.live[row]),
            in_flight=int(self.in_flight[row]),
            queue_depth=int(self.queue_depth[row]),
            ttft_ewma_s=opt(self.ttft[row]),
            tpot_ewma_s=opt(self.tpot[row]),
            error_streak=int(self.error_streak[row]),
            banned_until=float(self.banned_until[row]),
            last_failure_at=None if last == 0.0 else last,
            quality=opt(self.quality[row]),
            joined_at=float(self.joined_at[row]),
        )

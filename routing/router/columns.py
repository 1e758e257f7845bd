"""A model's node snapshots as numpy columns, for large fleets.

At 1000 nodes a Python pass over the snapshots costs ~80 us on the 2-core test machine and a
profile makes ~11 of them; one numpy operation over 1000 floats costs ~2 us. So the Router keeps,
for models with many nodes, the same data as its NodeSnapshots in columns (row i = the i-th
snapshot of the model) and updates one row in place whenever it rebuilds a node's snapshot.
Plugins that implement the vectorised methods (`filter_idx`, `score_idx`, `pick_array`) then run
on row indices instead of lists. The values are exactly the snapshots': a test checks that both
paths keep and score the same nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from routing.router.snapshot import NodeSnapshot

_NAN = math.nan


class Columns:
    """Row-aligned numpy arrays of one model's snapshots. None becomes NaN (quality, EWMAs) or 0.0
    (last_failure_at, as the not-banned filter already treats it)."""

    FLOATS = (
        "in_flight",
        "queue_depth",
        "capacity",
        "banned_until",
        "last_failure_at",
        "quality",
        "ttft",
        "tpot",
        "joined_at",
        "key",
    )

    def __init__(self, model: str, snaps: Sequence[NodeSnapshot]) -> None:
        self.model = model
        self.ids = [s.node_id for s in snaps]
        self.pos = {nid: i for i, nid in enumerate(self.ids)}
        self.size = len(snaps)
        self.live = np.array([s.live for s in snaps], dtype=bool)
        for name in self.FLOATS:
            setattr(self, name, np.empty(self.size, dtype=np.float64))
        for i, s in enumerate(snaps):
            self.set_row(i, s)

    def set_row(self, i: int, s: NodeSnapshot) -> None:
        self.in_flight[i] = s.in_flight
        self.queue_depth[i] = s.queue_depth
        self.capacity[i] = s.capacity
        self.live[i] = s.live
        self.banned_until[i] = s.banned_until
        self.last_failure_at[i] = 0.0 if s.last_failure_at is None else s.last_failure_at
        self.quality[i] = _NAN if s.quality is None else s.quality
        self.ttft[i] = _NAN if s.ttft_ewma_s is None else s.ttft_ewma_s
        self.tpot[i] = _NAN if s.tpot_ewma_s is None else s.tpot_ewma_s
        self.joined_at[i] = s.joined_at
        self.key[i] = s._key

    def rows(self, exclude: frozenset[str] | set[str] = frozenset()) -> np.ndarray:
        """Row indices of every node except those in `exclude`."""
        idx = np.arange(self.size)
        drop = [self.pos[e] for e in exclude if e in self.pos]
        return np.delete(idx, drop) if drop else idx

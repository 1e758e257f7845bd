"""The routing framework: plugin kinds, their registry, and a compiled profile that runs them.

A profile is ordered Filters (each narrows the candidate list) -> weighted Scorers (each
returns one score per candidate) -> exactly one Picker (returns an index). Plugins only
compute; the framework clamps scores to [0,1] (NaN counts as 0), applies weights normalised to
sum to 1, times every plugin, and builds an explanation when asked. Plugins work on the whole
candidate list at once, because a Python call per (plugin, node) pair would be too slow at
1000 nodes; built-ins also implement the same logic over numpy columns (`*_idx` / `pick_array`,
see columns.py), which `Profile.run_columns` uses for large fleets.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from routing.router.columns import Columns
from routing.router.snapshot import Decision, Explanation, NodeSnapshot, NoEligibleNode, RequestFacts


class NoParams(BaseModel):
    """Parameters of a plugin that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(slots=True)
class PickContext:
    """Per-decision inputs that are not about the request or a node: the time and the randomness."""

    now: float
    rng: random.Random


class Plugin:
    """Base of every plugin. `Params` is the pydantic model of its YAML `parameters`."""

    kind: ClassVar[str] = ""
    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, name: str, params: BaseModel) -> None:
        self.name = name
        self.params = params


class Filter(Plugin):
    """Narrows the candidates. `filter_idx`, if a subclass defines it, is the same filter over
    row indices of a Columns view (used for large fleets); it must keep exactly the same nodes."""

    kind = "filter"
    filter_idx: ClassVar[Callable | None] = None  # (facts, cols, idx, ctx) -> idx

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        raise NotImplementedError


class Scorer(Plugin):
    """Scores each candidate, ideally in [0,1]. Optional `score_idx`: the same over Columns rows."""

    kind = "scorer"
    score_idx: ClassVar[Callable | None] = None  # (facts, cols, idx, ctx) -> np.ndarray

    def score(self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext) -> Sequence[float]:
        raise NotImplementedError


class Picker(Plugin):
    """Chooses an index into the totals. Optional `pick_array`: the same over a numpy array."""

    kind = "picker"
    pick_array: ClassVar[Callable | None] = None  # (facts, totals: np.ndarray, ctx) -> int

    def pick(self, facts: RequestFacts, totals: Sequence[float], ctx: PickContext) -> int:
        raise NotImplementedError


REGISTRY: dict[str, type[Plugin]] = {}


def register(type_name: str):
    """Class decorator: make a plugin available to configs under `type_name`."""

    def deco(cls: type[Plugin]) -> type[Plugin]:
        if type_name in REGISTRY:
            raise ValueError(
                f"plugin type {type_name!r} is registered twice ({REGISTRY[type_name]} and {cls})"
            )
        cls.type_name = type_name
        REGISTRY[type_name] = cls
        return cls

    return deco


class PluginTimings:
    """Cumulative time per plugin (calls, total ns) since the router was built, for /metrics or debugging.

    Each profile owns one slot per plugin (a list index, not a dict key) so timing costs
    ~0.2 us per plugin on the hot path.
    """

    def __init__(self) -> None:
        self.slots: dict[str, list[int]] = {}  # "profile/plugin" -> [calls, total_ns]

    def slot(self, key: str) -> list[int]:
        return self.slots.setdefault(key, [0, 0])

    def mean_us(self) -> dict[str, float]:
        return {k: ns / calls / 1000 for k, (calls, ns) in self.slots.items() if calls}


def _clamped(raw: Sequence[float]) -> Sequence[float]:
    """raw clamped to [0,1], NaN -> 0. The common all-in-range case is checked at C speed:
    sum() is NaN if any element is NaN (or +inf and -inf meet), min/max catch the rest."""
    total = sum(raw)
    if not math.isnan(total) and min(raw) >= 0.0 and max(raw) <= 1.0:
        return raw
    # `not x > 0.0` is also true for NaN, which therefore scores 0.
    return [0.0 if not x > 0.0 else (min(x, 1.0)) for x in raw]


class Profile:
    """A compiled routing profile (built by `routing.router.config.build_profiles`)."""

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
    ) -> None:
        self.name = name
        self.filters = tuple(filters)
        total = sum(w for _, w in scorers)
        # Normalised weights keep totals in [0,1], so a picker's temperature means the same in every profile.
        self.scorers = tuple((s, w / total) for s, w in scorers) if total > 0 else ()
        self.picker = picker
        self._timings: PluginTimings | None = None
        # True when every plugin can also run on Columns (the large-fleet path).
        self.vectorised = (
            all(f.filter_idx is not None for f in self.filters)
            and all(s.score_idx is not None for s, _ in self.scorers)
            and picker.pick_array is not None
        )

    def _bind(self, timings: PluginTimings) -> None:
        self._timings = timings
        self._fslots = [timings.slot(f"{self.name}/{f.name}") for f in self.filters]
        self._sslots = [timings.slot(f"{self.name}/{s.name}") for s, _ in self.scorers]
        self._pslot = timings.slot(f"{self.name}/{self.picker.name}")

    def run(
        self,
        facts: RequestFacts,
        nodes: Sequence[NodeSnapshot],
        ctx: PickContext,
        timings: PluginTimings,
        explain: bool = False,
    ) -> Decision:
        if self._timings is not timings:
            self._bind(timings)
        clock = time.perf_counter_ns
        removed: list[tuple[str, tuple[str, ...]]] = []
        spent: dict[str, float] = {}
        if not nodes:
            raise NoEligibleNode(
                facts.model, self.name, "no candidate nodes (all excluded or none registered)"
            )
        for f, slot in zip(self.filters, self._fslots):
            t0 = clock()
            kept = f.filter(facts, nodes, ctx)
            dt = clock() - t0
            slot[0] += 1
            slot[1] += dt
            if explain:
                ids = {n.node_id for n in kept}
                removed.append((f.name, tuple(n.node_id for n in nodes if n.node_id not in ids)))
                spent[f.name] = dt / 1000
            nodes = kept
            if not nodes:
                raise NoEligibleNode(
                    facts.model, self.name, f"filter {f.name!r} removed every remaining candidate"
                )
        n = len(nodes)
        weighted = []
        per_scorer: dict[str, Sequence[float]] = {}
        for (s, w), slot in zip(self.scorers, self._sslots):
            t0 = clock()
            raw = s.score(facts, nodes, ctx)
            dt = clock() - t0
            slot[0] += 1
            slot[1] += dt
            if len(raw) != n:
                raise RuntimeError(f"scorer {s.name!r} returned {len(raw)} scores for {n} candidates")
            clamped = _clamped(raw)
            weighted.append(map(w.__mul__, clamped))  # lazy: summed below in one C-level pass
            if explain:
                per_scorer[s.name] = list(clamped)
                spent[s.name] = dt / 1000
        totals = list(map(sum, zip(*weighted))) if weighted else [0.0] * n
        t0 = clock()
        index = self.picker.pick(facts, totals, ctx) if n > 1 else 0
        dt = clock() - t0
        self._pslot[0] += 1
        self._pslot[1] += dt
        explanation = None
        if explain:
            spent[self.picker.name] = dt / 1000
            scores = {
                node.node_id: {**{k: v[i] for k, v in per_scorer.items()}, "total": totals[i]}
                for i, node in enumerate(nodes)
            }
            explanation = Explanation(tuple(removed), scores, spent)
        return Decision(nodes[index].node_id, self.name, totals[index], n, explanation)

    def run_columns(
        self,
        facts: RequestFacts,
        cols: Columns,
        idx: np.ndarray,
        ctx: PickContext,
        timings: PluginTimings,
        explain: bool = False,
    ) -> Decision:
        """`run` over row indices of a Columns view: same plugins, same clamping and weights."""
        if self._timings is not timings:
            self._bind(timings)
        clock = time.perf_counter_ns
        removed: list[tuple[str, tuple[str, ...]]] = []
        spent: dict[str, float] = {}
        ids = cols.ids
        if not idx.size:
            raise NoEligibleNode(
                facts.model, self.name, "no candidate nodes (all excluded or none registered)"
            )
        for f, slot in zip(self.filters, self._fslots):
            t0 = clock()
            kept = f.filter_idx(facts, cols, idx, ctx)
            dt = clock() - t0
            slot[0] += 1
            slot[1] += dt
            if explain:
                removed.append((f.name, tuple(ids[i] for i in np.setdiff1d(idx, kept))))
                spent[f.name] = dt / 1000
            idx = kept
            if not idx.size:
                raise NoEligibleNode(
                    facts.model, self.name, f"filter {f.name!r} removed every remaining candidate"
                )
        n = idx.size
        totals = np.zeros(n)
        per_scorer: dict[str, np.ndarray] = {}
        for (s, w), slot in zip(self.scorers, self._sslots):
            t0 = clock()
            raw = np.asarray(s.score_idx(facts, cols, idx, ctx), dtype=np.float64)
            dt = clock() - t0
            slot[0] += 1
            slot[1] += dt
            if raw.shape != (n,):
                raise RuntimeError(f"scorer {s.name!r} returned {raw.shape} scores for {n} candidates")
            clamped = np.clip(np.nan_to_num(raw, nan=0.0), 0.0, 1.0)
            totals += w * clamped
            if explain:
                per_scorer[s.name] = clamped
                spent[s.name] = dt / 1000
        t0 = clock()
        index = int(self.picker.pick_array(facts, totals, ctx)) if n > 1 else 0
        dt = clock() - t0
        self._pslot[0] += 1
        self._pslot[1] += dt
        explanation = None
        if explain:
            spent[self.picker.name] = dt / 1000
            scores = {
                ids[row]: {**{k: float(v[i]) for k, v in per_scorer.items()}, "total": float(totals[i])}
                for i, row in enumerate(idx)
            }
            explanation = Explanation(tuple(removed), scores, spent)
        return Decision(ids[idx[index]], self.name, float(totals[index]), n, explanation)

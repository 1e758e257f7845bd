"""The routing framework: plugin kinds, their registry, and a compiled profile that runs them.

A profile is ordered Filters (each narrows a boolean row mask) -> weighted Scorers (each returns
one score per row) -> exactly one Picker (returns an index into the candidates' totals). Every
plugin has one implementation, over the numpy Columns of the nodes (columns.py). Plugins only
compute; the framework clamps scores to [0,1] (NaN counts as 0), applies weights normalised to
sum to 1, times every plugin, builds an explanation when asked, and keeps precomputed results:

- the leading filters marked `static` (their result depends only on the columns they `reads`
  and the request's model, row by row) run once per change of those columns: their mask is
  cached on the Columns under the columns' versions, and the request's excluded rows are
  removed after (row-wise filters commute with removing rows);
- a scorer marked `static` is cached the same way, and plugins cache their own static parts
  with `Columns.memo` (e.g. the latency scorer's per-node prediction before queueing).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
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
    """Base of every plugin. `Params` is the pydantic model of its YAML `parameters`.

    `static` plugins promise that their output depends only on the columns named in `reads` and
    on `facts.model` (not on the time, the randomness or other facts), row by row, so the
    framework may cache it until one of those columns changes.
    """

    kind: ClassVar[str] = ""
    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    static: ClassVar[bool] = False
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: BaseModel) -> None:
        self.name = name
        self.params = params


class Filter(Plugin):
    """Narrows the candidates: returns the mask of rows it keeps (a subset of `mask`)."""

    kind = "filter"

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        raise NotImplementedError

    def fallback(
        self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext
    ) -> np.ndarray | None:
        """What to keep when `filter` removed every candidate in `mask`: None (the default) refuses the
        request; a non-empty subset serves it anyway, and the framework marks the decision degraded
        (`Decision.degraded` names the filter, the gateway says so in a header, a metric and its log)."""
        return None

    def filter_nodes(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        """Convenience for tests and tools: the same filter over snapshots."""
        cols = Columns(nodes)
        kept = self.filter(facts, cols, cols.mask(), ctx)
        return [n for n, k in zip(nodes, kept) if k]


class Scorer(Plugin):
    """Scores every row, ideally in [0,1] (only the rows in `mask` are candidates; the others are
    ignored). `after_pick` lets a scorer learn where a request went (e.g. the prefix-cache index).
    `bounded` scorers promise finite scores in [0,1] by construction (a test checks each built-in
    on random inputs), so the framework skips clamping them; every other scorer is clamped."""

    kind = "scorer"
    bounded: ClassVar[bool] = False

    def score(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        raise NotImplementedError

    def after_pick(self, facts: RequestFacts, node_id: str, ctx: PickContext) -> None:
        """Called once per decision with the chosen node (default: nothing)."""

    def score_nodes(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[float]:
        """Convenience for tests and tools: the raw scores over snapshots."""
        cols = Columns(nodes)
        return [float(x) for x in self.score(facts, cols, cols.mask(), ctx)]


class Picker(Plugin):
    """Chooses an index into the candidates' totals (a 1-d array, two or more entries)."""

    kind = "picker"

    def pick(self, facts: RequestFacts, totals: np.ndarray, ctx: PickContext) -> int:
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

    Each profile owns one slot per plugin (a list, not a dict lookup) so timing stays cheap.
    """

    def __init__(self) -> None:
        self.slots: dict[str, list[int]] = {}  # "profile/plugin" -> [calls, total_ns]

    def slot(self, key: str) -> list[int]:
        return self.slots.setdefault(key, [0, 0])

    def mean_us(self) -> dict[str, float]:
        return {k: ns / calls / 1000 for k, (calls, ns) in self.slots.items() if calls}


_fmax, _fmin = np.fmax, np.fmin


def clamp(raw: np.ndarray) -> np.ndarray:
    """raw clamped to [0,1]; NaN -> 0 (fmax/fmin return the non-NaN operand)."""
    return _fmin(_fmax(raw, 0.0), 1.0)


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
        n = 0
        while n < len(self.filters) and self.filters[n].static:
            n += 1
        self.static_filters = self.filters[:n]
        self.static_reads = tuple(sorted({r for f in self.static_filters for r in f.reads}))
        self.learners = tuple(s for s, _ in self.scorers if type(s).after_pick is not Scorer.after_pick)

    def _bind(self, timings: PluginTimings) -> None:
        self._timings = timings
        self._fslots = [timings.slot(f"{self.name}/{f.name}") for f in self.filters]
        self._sslots = [timings.slot(f"{self.name}/{s.name}") for s, _ in self.scorers]
        self._pslot = timings.slot(f"{self.name}/{self.picker.name}")

    def _static_mask(self, facts: RequestFacts, cols: Columns, ctx: PickContext) -> np.ndarray:
        """The leading static filters over every row, recomputed only when a column they read changed."""
        key = ("filters", self.name, facts.model, cols.versions_of(self.static_reads))
        hit = cols.cache.get(key)
        if hit is None:
            hit = cols.all_rows
            for f in self.static_filters:
                hit = f.filter(facts, cols, hit, ctx)
            cols.cache[key] = hit
        return hit

    def _static_score(self, s: Scorer, facts: RequestFacts, cols: Columns, ctx: PickContext) -> np.ndarray:
        key = ("scorer", self.name, s.name, facts.model, cols.versions_of(s.reads))
        hit = cols.cache.get(key)
        if hit is None:
            hit = cols.cache[key] = clamp(np.asarray(s.score(facts, cols, cols.all_rows, ctx), dtype=float))
        return hit

    def run(
        self,
        facts: RequestFacts,
        cols: Columns,
        mask: np.ndarray,
        ctx: PickContext,
        timings: PluginTimings,
        explain: bool = False,
        cached: bool = True,
    ) -> Decision:
        """Decide among the rows of `cols` in `mask`. `cached=False` recomputes every plugin from
        scratch (what the precomputed state must always equal; the property tests compare them)."""
        if self._timings is not timings:
            self._bind(timings)
        if not cached or len(cols.cache) > 64:  # stale versions pile up as inputs change
            cols.cache.clear()
        if not np.count_nonzero(mask):
            raise NoEligibleNode(
                facts.model, self.name, "no candidate nodes (all excluded or none registered)", "excluded"
            )
        trace = _Trace() if explain else None
        degraded: list[str] = []  # filters that emptied the list and kept their fallback instead
        mask = self._filter(facts, cols, mask, ctx, cached, trace, degraded)
        idx = np.flatnonzero(mask)
        totals = self._score(facts, cols, mask, ctx, cached, trace)
        cand = totals[idx]
        t0 = time.perf_counter_ns()
        index = int(self.picker.pick(facts, cand, ctx)) if idx.size > 1 else 0
        dt = time.perf_counter_ns() - t0
        self._pslot[0] += 1
        self._pslot[1] += dt
        node_id = cols.ids[idx[index]]
        for s in self.learners:
            s.after_pick(facts, node_id, ctx)
        explanation = None
        if trace is not None:
            trace.spent[self.picker.name] = dt / 1000
            explanation = trace.explanation(cols.ids, idx, totals)
        return Decision(node_id, self.name, float(cand[index]), idx.size, explanation, tuple(degraded))

    def _filter(
        self,
        facts: RequestFacts,
        cols: Columns,
        mask: np.ndarray,
        ctx: PickContext,
        cached: bool,
        trace: _Trace | None,
        degraded: list[str],
    ) -> np.ndarray:
        """The rows every filter keeps (a filter that would empty them keeps its fallback instead and is
        added to `degraded`); NoEligibleNode names the filter that emptied them."""
        clock = time.perf_counter_ns
        first = 0
        if cached and self.static_filters and trace is None:
            narrowed = self._static_pass(facts, cols, mask, ctx)
            if np.count_nonzero(narrowed):  # else (rare) run them one by one below, which names the culprit
                mask, first = narrowed, len(self.static_filters)
        for f, slot in zip(self.filters[first:], self._fslots[first:]):
            t0 = clock()
            kept = f.filter(facts, cols, mask, ctx)
            dt = clock() - t0
            slot[0] += 1
            slot[1] += dt
            if trace is not None:
                trace.removed.append((f.name, tuple(cols.ids[i] for i in np.flatnonzero(mask & ~kept))))
                trace.spent[f.name] = dt / 1000
            if not np.count_nonzero(kept):
                rescue = f.fallback(facts, cols, mask, ctx)
                if rescue is not None and np.count_nonzero(rescue):
                    kept = rescue & mask
                    degraded.append(f.name)
            mask = kept
            if not np.count_nonzero(mask):
                raise NoEligibleNode(
                    facts.model, self.name, f"filter {f.name!r} removed every remaining candidate", f.name
                )
        return mask

    def _static_pass(
        self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext
    ) -> np.ndarray:
        """`mask` narrowed by the leading static filters' cached mask, the time shared evenly among them."""
        t0 = time.perf_counter_ns()
        narrowed = mask & self._static_mask(facts, cols, ctx)
        dt = time.perf_counter_ns() - t0
        for slot in self._fslots[: len(self.static_filters)]:
            slot[0] += 1
            slot[1] += dt // len(self.static_filters)
        return narrowed

    def _score(
        self,
        facts: RequestFacts,
        cols: Columns,
        mask: np.ndarray,
        ctx: PickContext,
        cached: bool,
        trace: _Trace | None,
    ) -> np.ndarray:
        """Every row's weighted sum of its clamped scores (only the rows in `mask` are candidates)."""
        clock = time.perf_counter_ns
        totals = np.zeros(cols.size)
        for (s, w), slot in zip(self.scorers, self._sslots):
            t0 = clock()
            if s.static and cached:
                clamped = self._static_score(s, facts, cols, ctx)
            else:
                raw = np.asarray(s.score(facts, cols, mask, ctx), dtype=np.float64)
                if raw.shape != (cols.size,):
                    raise RuntimeError(f"scorer {s.name!r} returned {raw.shape} scores for {cols.size} rows")
                clamped = raw if s.bounded else clamp(raw)
            totals += w * clamped
            dt = clock() - t0
            slot[0] += 1
            slot[1] += dt
            if trace is not None:
                trace.scores[s.name] = clamped
                trace.spent[s.name] = dt / 1000
        return totals


class _Trace:
    """What an explained decision records: each filter's removals, each scorer's clamped scores,
    each plugin's time (us)."""

    __slots__ = ("removed", "scores", "spent")

    def __init__(self) -> None:
        self.removed: list[tuple[str, tuple[str, ...]]] = []
        self.scores: dict[str, np.ndarray] = {}
        self.spent: dict[str, float] = {}

    def explanation(self, ids, idx: np.ndarray, totals: np.ndarray) -> Explanation:
        scores = {
            ids[row]: {**{k: float(v[row]) for k, v in self.scores.items()}, "total": float(totals[row])}
            for row in idx
        }
        return Explanation(tuple(self.removed), scores, self.spent)

"""The routing framework: plugin kinds, their registry, and a compiled profile that runs them.

A profile is ordered Filters (each narrows the candidate list) -> weighted Scorers (each
returns one score per candidate) -> exactly one Picker (returns an index). Plugins only
compute; the framework clamps scores to [0,1] (NaN counts as 0), applies weights normalised to
sum to 1, times the plugins (one decision in `PluginTimings.every`), and builds an explanation
when asked. Plugins work on the whole candidate list at once, because a Python call per
(plugin, node) pair would be too slow at 1000 nodes; built-ins also implement the same logic
over numpy columns (`*_idx` / `pick_array`, see columns.py), which `Profile.run_columns` uses
for large fleets.

Per-node plugins. A filter whose verdict on a node depends only on that node and the requested
model (`keeps`), or a scorer whose score depends only on the node (`score_node`), need not run
on every decision: the Router evaluates the profile's *leading* per-node filters and scorers
once, when it rebuilds a node's snapshot (`Profile.prepare`, stored in the snapshot), keeps per
model the list of nodes those filters keep, and a decision starts from that list and from each
node's precomputed weighted score (`run(..., prepared=True)`). Only a leading run of them, so
the filters that reason about the remaining set and the order in which weighted scores are
added stay exactly as listed: decisions are bit-identical either way (tested).
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
    row indices of a Columns view (used for large fleets); it must keep exactly the same nodes.

    `keeps(model, node) -> bool`, if a subclass defines it, says whether the filter keeps `node`
    for a request for `model`, from those two alone: only for filters that read no other request
    fact, no time, no randomness and no other candidate (so `filter` equals keeping each node
    for which `keeps` is true). The Router then evaluates it when a snapshot changes instead of
    on every decision (see the module docstring)."""

    kind = "filter"
    filter_idx: ClassVar[Callable | None] = None  # (facts, cols, idx, ctx) -> idx
    keeps: ClassVar[Callable | None] = None  # (model, node) -> bool

    def filter(self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext) -> list[NodeSnapshot]:
        raise NotImplementedError


class Scorer(Plugin):
    """Scores each candidate, ideally in [0,1]. Optional `score_idx`: the same over Columns rows.
    Optional `score_node(node) -> float`: the score of one node from the node alone, for scorers
    that read nothing else (no request, time, randomness or other candidate), so `score` equals
    `[score_node(n) for n in nodes]`; the Router then computes it when a snapshot changes."""

    kind = "scorer"
    score_idx: ClassVar[Callable | None] = None  # (facts, cols, idx, ctx) -> np.ndarray
    score_node: ClassVar[Callable | None] = None  # (node) -> float

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
            raise ValueError(f"plugin type {type_name!r} is registered twice ({REGISTRY[type_name]} and {cls})")
        cls.type_name = type_name
        REGISTRY[type_name] = cls
        return cls

    return deco


class PluginTimings:
    """Time per plugin (timed calls, total ns) since the router was built, for /metrics or debugging.

    Reading the clock around every plugin of every decision costs ~0.5 us per plugin (5-10% of a
    64-node decision on the 2-core test machine), so a profile times one decision in `every`
    (every plugin of that decision) and `mean_us` is the mean over the timed calls: an unbiased
    estimate, as decisions are sampled regardless of their content. every=1 times all of them;
    a decision with explain=True is always timed. Per-node plugins that the Router precomputes
    per snapshot (module docstring) do not run on its decisions, so they get no time there.
    Each profile owns one slot per plugin (a list, not a dict key) so recording costs ~0.2 us.
    """

    def __init__(self, every: int = 128) -> None:
        if type(every) is not int or every < 1:
            raise ValueError(f"every must be an int >= 1 (1 = time every decision), got {every!r}")
        self.every = every
        self.slots: dict[str, list[int]] = {}  # "profile/plugin" -> [timed calls, total_ns]

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


def _in_range(raw: Sequence[float]) -> bool:
    """True if no element is below 0 or above 1; NaNs may slip through (caught on the totals).
    sorted() of floats compares at C speed: ~2x cheaper than min() plus max() for 50 floats."""
    ordered = sorted(raw)
    return ordered[0] >= 0.0 and ordered[-1] <= 1.0


def _weigher(weights: Sequence[float], base_at: int | None = None) -> Callable[..., list[float]]:
    """f(nodes, r0, r1, ...) -> [w0*r0[i] + w1*r1[i] + ... for each i], the weighted sum of k score
    lists in one comprehension generated for the profile's k (as dataclasses generate __init__):
    a third of the cost of summing k lazily weighted maps with zip(*)/sum (10 vs 28 us for 4 x 44
    scores on the test machine). With `base_at`, each total starts from the node's precomputed
    weighted sum of the leading per-node scorers, `node._prep[base_at]`. Terms are added left to
    right from the first, as sum() adds them, so totals are bit-identical to the plain sum."""
    k = len(weights)
    terms = [f"w{j} * x{j}" for j in range(k)]
    loop_vars = [f"x{j}" for j in range(k)]
    lists = [f"r{j}" for j in range(k)]
    if base_at is not None:
        terms.insert(0, f"n._prep[{int(base_at)}]")
        loop_vars.insert(0, "n")
        lists.insert(0, "nodes")
    if not terms:  # no scorers: every candidate totals 0
        return lambda nodes: [0.0] * len(nodes)
    source = (f"lambda nodes, {', '.join(f'r{j}' for j in range(k))}: "
              f"[{' + '.join(terms)} for {', '.join(loop_vars)}, in zip({', '.join(lists)})]")
    return eval(source, {f"w{j}": w for j, w in enumerate(weights)})  # our own source; weights as values


def _clamp(x: float) -> float:
    """One score clamped to [0,1], NaN -> 0 (as `_clamped` does to a list)."""
    return x if 0.0 <= x <= 1.0 else 0.0 if not x > 0.0 else min(x, 1.0)


def _leading(plugins: Sequence, per_node: Callable[[object], bool]) -> int:
    """How many plugins at the start of `plugins` satisfy `per_node`."""
    count = 0
    for p in plugins:
        if not per_node(p):
            break
        count += 1
    return count


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
        # The leading per-node plugins, which `prepare` evaluates once per snapshot (module docstring).
        nf = _leading(self.filters, lambda f: f.keeps is not None)
        ns = _leading(self.scorers, lambda sw: sw[0].score_node is not None)
        self.node_filters, self.node_scorers = self.filters[:nf], self.scorers[:ns]
        self._rest_scorers = self.scorers[ns:]
        self._prep_at: int | None = None
        self._timings: PluginTimings | None = None
        self._countdown = 0  # decisions until the next timed one
        # True when every plugin can also run on Columns (the large-fleet path).
        self.vectorised = (all(f.filter_idx is not None for f in self.filters)
                           and all(s.score_idx is not None for s, _ in self.scorers)
                           and picker.pick_array is not None)

    @property
    def prepares(self) -> bool:
        """True if the profile has leading per-node plugins to evaluate when a snapshot changes."""
        return bool(self.node_filters or self.node_scorers)

    def prepare(self, node: NodeSnapshot) -> tuple[bool, float]:
        """(kept by every leading per-node filter, weighted sum of the leading per-node scorers'
        clamped scores) of `node`, for a request for the node's own model. The Router stores the
        pair in the snapshot (`_prep`, at the index it gave `prepared_at`). Adding from 0.0 gives
        the same float as the list path's w0*x0 + w1*x1 (0.0 + y == y)."""
        model = node.model_id
        kept = True
        for f in self.node_filters:  # a loop, not all(<generator>): this runs on every begin/end
            if not f.keeps(model, node):
                kept = False
                break
        base = 0.0
        for s, w in self.node_scorers:
            base += w * _clamp(s.score_node(node))
        return kept, base

    @property
    def prep_at(self) -> int | None:
        """Where the Router stores `prepare(node)` in each snapshot: `node._prep[at:at + 2]`."""
        return self._prep_at

    def prepared_at(self, at: int) -> None:
        """Tell the profile where the Router stores `prepare(node)` (see `prep_at`)."""
        self._prep_at = at
        self._timings = None  # rebind: the lean plan is built with the timing slots

    def _bind(self, timings: PluginTimings) -> None:
        """Resolve the timing slots and build the two plans, (filters, scorers, weigh): `_full` runs
        every plugin; `_lean` (prepared snapshots) only those after the leading per-node ones."""
        self._timings = timings
        fslots = [timings.slot(f"{self.name}/{f.name}") for f in self.filters]
        sslots = [timings.slot(f"{self.name}/{s.name}") for s, _ in self.scorers]
        self._pslot = timings.slot(f"{self.name}/{self.picker.name}")
        self._full = (tuple(zip(self.filters, fslots)), tuple(zip((s for s, _ in self.scorers), sslots)),
                      _weigher([w for _, w in self.scorers]))
        self._lean = None
        if self._prep_at is not None:
            nf, ns = len(self.node_filters), len(self.node_scorers)
            self._lean = (self._full[0][nf:], self._full[1][ns:],
                          _weigher([w for _, w in self._rest_scorers], self._prep_at + 1 if ns else None))
        self._countdown = 0

    def _timed(self, timings: PluginTimings, explain: bool) -> bool:
        """Whether to time this decision: one in `timings.every`, and every explained one."""
        if self._timings is not timings:
            self._bind(timings)
        self._countdown -= 1
        if self._countdown > 0:
            return explain
        self._countdown = timings.every
        return True

    def run(
        self,
        facts: RequestFacts,
        nodes: Sequence[NodeSnapshot],
        ctx: PickContext,
        timings: PluginTimings,
        explain: bool = False,
        prepared: bool = False,
    ) -> Decision:
        """Filter, score and pick among `nodes`. `prepared=True` promises that every node serves
        `facts.model`, carries this profile's `prepare` values and is kept by its leading per-node
        filters (the Router's own candidate lists): those filters are then skipped and the leading
        per-node scorers' weighted sum read from the snapshots. Explained decisions run every
        plugin, so that the explanation lists each one's removals, scores and time."""
        timed = self._timed(timings, explain)
        if not nodes:
            raise NoEligibleNode(facts.model, self.name, "no candidate nodes (all excluded or none registered)")
        if prepared and not explain and self._lean is not None:
            filters, scorers, weigh = self._lean
        else:
            filters, scorers, weigh = self._full
        clock = time.perf_counter_ns
        # Only explained decisions collect removals and per-plugin times.
        removed: list[tuple[str, tuple[str, ...]]] | None = [] if explain else None
        spent: dict[str, float] | None = {} if explain else None
        for f, slot in filters:
            t0 = clock() if timed else 0
            kept = f.filter(facts, nodes, ctx)
            if timed:
                dt = clock() - t0
                slot[0] += 1
                slot[1] += dt
                if explain:
                    ids = {n.node_id for n in kept}
                    removed.append((f.name, tuple(n.node_id for n in nodes if n.node_id not in ids)))
                    spent[f.name] = dt / 1000
            nodes = kept
            if not nodes:
                raise NoEligibleNode(facts.model, self.name, f"filter {f.name!r} removed every remaining candidate")
        n = len(nodes)
        raws = []
        for s, slot in scorers:
            t0 = clock() if timed else 0
            raw = s.score(facts, nodes, ctx)
            if timed:
                dt = clock() - t0
                slot[0] += 1
                slot[1] += dt
                if explain:
                    spent[s.name] = dt / 1000
            if len(raw) != n:
                raise RuntimeError(f"scorer {s.name!r} returned {len(raw)} scores for {n} candidates")
            raws.append(raw if not explain and _in_range(raw) else _clamped(raw))
        totals = weigh(nodes, *raws)
        if raws and math.isnan(sum(totals)):  # a NaN score that _in_range let through: it counts as 0
            raws = [_clamped(raw) for raw in raws]
            totals = weigh(nodes, *raws)
        t0 = clock() if timed else 0
        index = self.picker.pick(facts, totals, ctx) if n > 1 else 0
        explanation = None
        if timed:
            dt = clock() - t0
            self._pslot[0] += 1
            self._pslot[1] += dt
            if explain:
                spent[self.picker.name] = dt / 1000
                per_scorer = {s.name: list(raw) for (s, _), raw in zip(self.scorers, raws)}
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
        timed = self._timed(timings, explain)
        clock = time.perf_counter_ns
        # Only explained decisions collect removals and per-plugin times.
        removed: list[tuple[str, tuple[str, ...]]] | None = [] if explain else None
        spent: dict[str, float] | None = {} if explain else None
        ids = cols.ids
        if not idx.size:
            raise NoEligibleNode(facts.model, self.name, "no candidate nodes (all excluded or none registered)")
        for f, slot in self._full[0]:
            t0 = clock() if timed else 0
            kept = f.filter_idx(facts, cols, idx, ctx)
            if timed:
                dt = clock() - t0
                slot[0] += 1
                slot[1] += dt
                if explain:
                    removed.append((f.name, tuple(ids[i] for i in np.setdiff1d(idx, kept))))
                    spent[f.name] = dt / 1000
            idx = kept
            if not idx.size:
                raise NoEligibleNode(facts.model, self.name, f"filter {f.name!r} removed every remaining candidate")
        n = idx.size
        totals = np.zeros(n)
        per_scorer: dict[str, np.ndarray] = {}
        for (s, w), (_, slot) in zip(self.scorers, self._full[1]):
            t0 = clock() if timed else 0
            raw = np.asarray(s.score_idx(facts, cols, idx, ctx), dtype=np.float64)
            if timed:
                dt = clock() - t0
                slot[0] += 1
                slot[1] += dt
                if explain:
                    spent[s.name] = dt / 1000
            if raw.shape != (n,):
                raise RuntimeError(f"scorer {s.name!r} returned {raw.shape} scores for {n} candidates")
            clamped = np.clip(np.nan_to_num(raw, nan=0.0), 0.0, 1.0)
            totals += w * clamped
            if explain:
                per_scorer[s.name] = clamped
        t0 = clock() if timed else 0
        index = int(self.picker.pick_array(facts, totals, ctx)) if n > 1 else 0
        explanation = None
        if timed:
            dt = clock() - t0
            self._pslot[0] += 1
            self._pslot[1] += dt
            if explain:
                spent[self.picker.name] = dt / 1000
                scores = {
                    ids[row]: {**{k: float(v[i]) for k, v in per_scorer.items()}, "total": float(totals[i])}
                    for i, row in enumerate(idx)
                }
                explanation = Explanation(tuple(removed), scores, spent)
        return Decision(ids[idx[index]], self.name, float(totals[index]), n, explanation)

"""Built-in pickers: choose one candidate index from the weighted totals (each in [0,1]).

The framework calls a picker only with two or more candidates, as a 1-d numpy array.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from routing.router.framework import PickContext, Picker, register
from routing.router.snapshot import RequestFacts


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaxParams(_Params):
    tie_epsilon: float = Field(
        default=1e-9,
        ge=0,
        le=1,
        description="Totals within this of the best count as tied (random tie-break).",
    )


@register("max-score")
class MaxScore(Picker):
    """Picks the highest total; ties (within tie_epsilon) are broken uniformly at random, so equal
    nodes share traffic instead of the first one in the list taking it all.

    Parameters: tie_epsilon.  Example: `{name: max-score, type: max-score}`
    """

    Params = MaxParams

    def pick(self, facts: RequestFacts, totals: np.ndarray, ctx: PickContext) -> int:
        totals = np.asarray(totals)
        ties = np.flatnonzero(totals >= totals.max() - self.params.tie_epsilon)
        return int(ties[0]) if ties.size == 1 else int(ties[int(ctx.rng.random() * ties.size)])


class WeightedParams(_Params):
    temperature: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="Softmax temperature over totals in [0,1]: 0.05 is nearly max-score, 1.0 nearly uniform.",
    )


@register("weighted-random")
class WeightedRandom(Picker):
    """Samples a candidate with probability proportional to exp(total / temperature).

    Spreads load over good nodes instead of herding onto the single best one between stats
    refreshes. Parameters: temperature.
    Example: `{name: softmax, type: weighted-random, parameters: {temperature: 0.1}}`
    """

    Params = WeightedParams

    def pick(self, facts: RequestFacts, totals: np.ndarray, ctx: PickContext) -> int:
        totals = np.asarray(totals)
        cum = np.cumsum(np.exp((totals - totals.max()) / self.params.temperature))
        return min(int(np.searchsorted(cum, ctx.rng.random() * cum[-1], side="right")), totals.size - 1)


@register("power-of-two")
class PowerOfTwo(Picker):
    """Samples two distinct candidates uniformly and keeps the higher total (random on a tie).

    Nearly as good as max-score at balancing, and robust to stale stats because no single
    node is everyone's best. Parameters: none.  Example: `{name: p2c, type: power-of-two}`
    """

    def pick(self, facts: RequestFacts, totals: np.ndarray, ctx: PickContext) -> int:
        n = len(totals)
        rnd = ctx.rng.random
        a = int(rnd() * n)
        b = int(rnd() * (n - 1))
        if b >= a:
            b += 1
        if totals[a] == totals[b]:
            return a if rnd() < 0.5 else b
        return a if totals[a] > totals[b] else b

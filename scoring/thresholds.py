"""The decision thresholds of token verification (`scoring.verify`), and `calibrate`, which derives
them from honest completions where node and reference differ.

VerifyThresholds holds the margin tolerance (how far honest float noise moves a token's margin), the
two Bernoulli tests' rates (violations: honest_rate vs cheat_rate; flips: honest_flip_rate vs
cheat_flip_rate) with their log-likelihood ratios, the per-completion fraud rule and the logprob floor
of non-replayed samples. The defaults are calibrated on the default model; `provenance` says how.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

_PROVENANCE = (
    "benchmarks/verification.py --quick (2026-12-07, AMD EPYC, AVX2, no AVX-512/AMX; vLLM CPU 0.32): "
    "reference fp32 / 2 OpenMP threads / prefix caching; honest nodes bf16 or fp32, 1 thread, no prefix "
    "caching, batch 1 and 8, plus the reference's own engine at batch 1/4/16: 200 completions (12,976 "
    "tokens, greedy and seeded sampled at T 0.7-1.0) for calibration. Largest honest margin of a "
    "non-argmax token 0.30 nats, largest node-vs-reference margin noise 0.35 nats (both bf16 nodes; fp32 "
    "nodes at most 2.3e-5), margin 2 -> 0.70, rounded up to margin_tol 0.75. 0 honest violations at it "
    "(rule of three: rate < 2.3e-4); honest_rate 0.005 is kept 20x above that for hardware not measured "
    "here (AVX-512/AMX kernels, GPUs), cheat_rate 0.05. Re-run calibrate() for other models or hardware."
)


class VerifyThresholds(BaseModel):
    """Decision thresholds. Defaults are the values calibrated on the default model (see provenance)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int = Field(default=20, ge=1, le=100, description="Reference logprobs requested per position.")
    margin_tol: float = Field(
        default=0.75,
        ge=0.0,
        description="Largest margin (nats: reference logprob of its top-1 minus the emitted token's; for "
        "seeded replay, logit units before / T) still explained by honest float noise.",
    )
    honest_rate: float = Field(
        default=0.005,
        gt=0.0,
        lt=1.0,
        description="H0: the highest per-token violation rate of an honest node (calibrated, with margin).",
    )
    cheat_rate: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="H1: the lowest per-token violation rate the sequential test is built to catch.",
    )
    honest_flip_rate: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="H0 of the second test: the highest per-token rate at which an honest node emits a token "
        "other than the reference's top choice but inside `margin_tol` (a near-tie flipped by float noise). "
        "Measured 1.6-1.8% for bfloat16 nodes against a float32 reference (benchmarks/RESULTS.md, "
        "verification v3), so ~3x room.",
    )
    cheat_flip_rate: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="H1 of the second test: the lowest such rate it is built to catch; a node that takes the "
        "runner-up whenever the tolerance allows flipped ~26% of its tokens (near_tie_flipper).",
    )
    fraud_rate: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Violation share above which one completion is another model (fraud), when also ...",
    )
    fraud_alpha: float = Field(
        default=3e-11,
        gt=0.0,
        lt=1.0,
        description="... honest noise at `honest_rate` makes that many violations less likely than this "
        "(binomial tail). 3e-11 x 2^14 completions per node per epoch = 5e-7: half the 1e-6 budget "
        "(scoring.score.ScoreConfig states the other half).",
    )
    sampled_min_logprob: float = Field(
        default=-16.0,
        le=0.0,
        description="Non-replayed sampled tokens: a tempered reference logprob below this is a violation "
        "(capped at log(honest_rate / (4 x vocab)) so honest samplers stay well inside H0).",
    )
    count_tolerance: int = Field(
        default=1,
        ge=0,
        description="Tokens a reported count may exceed the verified count by (the EOS token is counted by "
        "some engines and not others; re-tokenised text may split differently).",
    )
    provenance: str = Field(
        default=_PROVENANCE,
        description="How these numbers were obtained (data, configurations, margin).",
    )

    @model_validator(mode="after")
    def _rates_ordered(self) -> VerifyThresholds:
        if not self.honest_rate < self.cheat_rate:
            raise ValueError(
                f"honest_rate ({self.honest_rate}) must be below cheat_rate ({self.cheat_rate}): the "
                "sequential test separates the two"
            )
        if not self.honest_flip_rate < self.cheat_flip_rate:
            raise ValueError(
                f"honest_flip_rate ({self.honest_flip_rate}) must be below cheat_flip_rate "
                f"({self.cheat_flip_rate}): the second sequential test separates the two"
            )
        return self

    def llr(self, tokens: int, violations: int) -> float:
        """log P(violations | cheat_rate) / P(violations | honest_rate) for `tokens` Bernoulli tokens."""
        p0, p1 = self.honest_rate, self.cheat_rate
        return violations * math.log(p1 / p0) + (tokens - violations) * math.log((1 - p1) / (1 - p0))

    def flip_llr(self, tokens: int, flips: int) -> float:
        """The same for flips (non-top tokens inside the tolerance) at honest_flip_rate vs cheat_flip_rate."""
        q0, q1 = self.honest_flip_rate, self.cheat_flip_rate
        return flips * math.log(q1 / q0) + (tokens - flips) * math.log((1 - q1) / (1 - q0))

    def floor_for(self, vocab_size: int) -> float:
        """The tempered-logprob floor: an honest sampler emits a token below it with probability at most
        vocab_size x e^floor <= honest_rate / 4."""
        return min(self.sampled_min_logprob, math.log(self.honest_rate / (4 * max(1, vocab_size))))


def calibrate(
    honest_margins: Sequence[Sequence[float]],
    *,
    noise: Sequence[float] = (),
    margin: float = 2.0,
    base: VerifyThresholds | None = None,
    note: str = "",
) -> VerifyThresholds:
    """Thresholds that explain every honest sample with room to spare.

    honest_margins: per honest completion, the margin of each token (`TokenCheck.margin` for greedy
    tokens; `scoring.replay.replay_margins` in logit units for seeded sampled ones), measured where node
    and reference DIFFER (dtype, threads, batch size, prefix caching), so that honest float noise shows.
    `margin_tol` becomes `margin` x the largest honest margin of a non-argmax token (at least base's
    tolerance / margin, so a sample without any flip does not shrink it to 0); `honest_rate` (H0)
    becomes `margin` x the honest violation rate at that tolerance, and at least 3 / tokens (the 95%
    upper bound when none is seen: the "rule of three") and base's rate; `cheat_rate` (H1) stays
    base's, at least 5 x honest_rate.
    """
    if margin < 1.0:
        raise ValueError("margin must be >= 1 (it widens the honest envelope)")
    base = base or VerifyThresholds()
    flips = [m for comp in honest_margins for m in comp if m > 0]
    worst = max(flips, default=0.0)
    worst_noise = max(noise, default=0.0)
    tol = max(margin * max(worst, worst_noise), base.margin_tol / margin)
    n_tok = sum(len(c) for c in honest_margins)
    violations = sum(m > tol for comp in honest_margins for m in comp)
    rate = max(margin * violations / max(1, n_tok), 3.0 / max(1, n_tok), base.honest_rate)
    cheat = max(base.cheat_rate, 5 * rate)
    inside = sum(0 < m <= tol for comp in honest_margins for m in comp)
    flip_rate = max(margin * inside / max(1, n_tok), 3.0 / max(1, n_tok), base.honest_flip_rate)
    prov = (
        f"calibrated from {len(honest_margins)} honest completions ({n_tok} tokens; node and reference "
        f"differing), margin {margin}: {len(flips)} non-argmax tokens, largest honest margin {worst:.3g} "
        f"nats, largest measured margin noise {worst_noise:.3g} nats over {len(noise)} positions -> "
        f"margin_tol {tol:.3g}; {violations} honest violations -> honest_rate {rate:.3g}, "
        f"cheat_rate {cheat:.3g}; {inside} honest flips inside it -> honest_flip_rate {flip_rate:.3g}. {note}"
    ).strip()
    return base.model_copy(
        update={
            "margin_tol": tol,
            "honest_rate": min(rate, 0.5),
            "cheat_rate": min(max(cheat, 2 * rate), 0.9),
            "honest_flip_rate": min(flip_rate, 0.4),
            "cheat_flip_rate": min(max(base.cheat_flip_rate, 2 * flip_rate), 0.9),
            "provenance": prov,
        }
    )

"""Model-identity verification of one completion, pure: no engine, no network.

The validator re-runs the node's completion through a trusted reference engine of the claimed model,
teacher-forced (prompt + the node's completion as one prompt, `prompt_logprobs=k`), so for every
completion position t it knows the reference's next-token distribution given exactly the node's prefix.
Divergence earlier in the text therefore never cascades: each token is judged on its own prefix.

Per token we record the rank of the emitted token in the reference distribution (1 = the reference's
argmax) and a probability distance, `gap = p_ref(top-1) - p_ref(emitted)` in [0, 1].

* Greedy requests (temperature 0): an honest node emits the argmax, except where two tokens are so close
  that batch-size-dependent float rounding flips them; such near-ties have a tiny gap. A token is a
  *mismatch* when rank > 1 and gap > `greedy_gap_tol`.
* Sampled requests with a seed (every request after the gateway) and a known node sampler: replayed
  (`scoring.replay`): the seed fixes the sampler's noise, so each position has one token the claimed
  model had to emit; a token the replay rules out is flagged (`replay_*` thresholds; positions where a
  token outside the reference's top-k might have won are "unsure" and not counted).
* Other sampled requests (no seed, top_p/top_k/penalties, or no replayable sampler): any token may
  legitimately appear, so a token is *implausible* only if the reference gives it logprob below
  `sampled_min_logprob` (or it falls outside the top-k and the engine did not return its logprob).

Structural checks need no engine: reported token counts against the token ids / re-tokenised text
(inflation is fraud), `finish_reason="length"` with fewer than max_tokens tokens (truncation is fraud),
and `finish_reason="stop"` must end where the reference would plausibly end (EOS check).

Verdicts: `pass`; `fail` (more mismatches than honest nondeterminism explains); `fraud` (structural lies,
or so many mismatches that it is a different model). Thresholds live in `VerifyThresholds`; `calibrate`
derives them from measured honest completions with a safety margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from scoring.replay import NoisyArgmax, replay_steps

Verdict = Literal["pass", "fail", "fraud"]


class ReferenceEngine(Protocol):
    """A trusted engine of the claimed model (vLLM in production, a fake in unit tests)."""

    def prompt_logprobs(
        self, prompt_token_ids: Sequence[int], completion_token_ids: Sequence[int], top_k: int
    ) -> list[dict[int, float]]:
        """For each completion position t: token id -> logprob of the reference's next-token
        distribution after prompt + completion[:t], holding the top_k tokens and always completion[t]."""
        ...


class TextCodec(Protocol):
    """The claimed model's tokenizer, as far as verification needs it."""

    eos_token_ids: frozenset[int]
    vocab_size: int  # ids a node returns must lie in [0, vocab_size)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of a completions prompt as the engine sees it (BOS etc. added); used by validators."""
        ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a chat prompt (template + generation prompt); used by validators."""
        ...


class VerifyThresholds(BaseModel):
    """Decision thresholds. Defaults are the values calibrated on the default model (see provenance)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int = Field(default=20, ge=1, le=100, description="Reference logprobs requested per position.")
    greedy_gap_tol: float = Field(
        default=1e-3,
        ge=0.0,
        le=1.0,
        description="Largest p(top1) - p(emitted) still treated as a near-tie flip under greedy decoding.",
    )
    greedy_fail_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Greedy mismatch fraction above which the completion fails."
    )
    greedy_fraud_rate: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Greedy mismatch fraction above which it is clearly another model (fraud).",
    )
    sampled_min_logprob: float = Field(
        default=-12.0, le=0.0, description="A sampled token with reference logprob below this is implausible."
    )
    sampled_fail_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Implausible fraction above which a sampled completion fails.",
    )
    sampled_fraud_rate: float = Field(
        default=0.3, ge=0.0, le=1.0, description="Implausible fraction above which it is fraud."
    )
    replay_tol: float = Field(
        default=1e-3,
        ge=0.0,
        description="Seeded replay: logit/T margin granted to the emitted token (float differences between "
        "the node's decode and the reference prefill).",
    )
    replay_fail_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Replay mismatch fraction above which a completion fails."
    )
    replay_fraud_rate: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Replay mismatch fraction above which it is fraud."
    )
    count_tolerance: int = Field(
        default=1,
        ge=0,
        description="Tokens a reported count may exceed the verified count by (the EOS token is counted by "
        "some engines and not others; re-tokenised text may split differently).",
    )
    provenance: str = Field(
        default="benchmarks/verification.py --quick: 120 honest greedy completions (4607 tokens) of the default "
        "model (seed 0) in vLLM CPU at batch sizes 1/4/16 showed no argmax flip (max near-tie gap 0), so the gap "
        "tolerance is calibrate()'s floor 1e-3 and any mismatch fails; fraud/sampled rates are hand-set caps. "
        "Re-run calibrate() for other models or hardware (GPU kernels flip more near-ties).",
        description="How these numbers were obtained (data, batch sizes, margin).",
    )


class Claim(BaseModel):
    """What the node returned for one request, plus the request parameters that constrain it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_token_ids: tuple[int, ...] = Field(description="Prompt ids under the claimed model's tokenizer.")
    text: str = Field(description="Completion text the node returned.")
    completion_token_ids: tuple[int, ...] | None = Field(
        default=None, description="Ids the node reported (vLLM return_token_ids); None -> re-tokenise text."
    )
    reported_completion_tokens: int = Field(ge=0, description="usage.completion_tokens the node reported.")
    finish_reason: str | None = Field(default=None, description="'stop', 'length', ... as reported.")
    max_tokens: int | None = Field(
        ge=1,
        description="max_tokens of the request; None (engine default: the rest of the context) skips the "
        "limit checks.",
    )
    temperature: float = Field(default=0.0, ge=0.0, description="Request temperature; 0 means greedy.")
    stop_strings: bool = Field(default=False, description="The request set stop strings (ends not checked).")
    seed: int | None = Field(
        default=None, description="The request's sampling seed (every request has one after the gateway)."
    )
    reshaped: bool = Field(
        default=False,
        description="The request set top_p/top_k/min_p/penalties/logit_bias: sampled replay cannot rebuild "
        "the distribution from top-k values, so the logprob floor applies instead.",
    )


@dataclass(frozen=True, slots=True)
class TokenCheck:
    position: int
    token_id: int
    rank: int  # 1 = reference argmax; top_k + 1 when outside the returned top-k
    logprob: float  # reference logprob of the emitted token (-inf when unknown)
    gap: float  # p_ref(top1) - p_ref(emitted), in [0, 1]


@dataclass(frozen=True, slots=True)
class Verification:
    verdict: Verdict
    reasons: tuple[str, ...]
    greedy: bool
    n_tokens: int
    flagged: int  # mismatches (greedy) or implausible tokens (sampled)
    max_gap: float
    mean_logprob: float
    tokens: tuple[TokenCheck, ...]
    replayed: bool = False  # sampled and checked by seeded replay (flagged = tokens the sampler forbids)
    unsure: int = 0  # replayed positions an unreported (outside top-k) token might have won

    @property
    def flagged_rate(self) -> float:
        return self.flagged / self.n_tokens if self.n_tokens else 0.0


def compare_tokens(
    completion_ids: Sequence[int], ref: Sequence[dict[int, float]], top_k: int
) -> list[TokenCheck]:
    """Rank and gap of each emitted token in the reference distribution at its position."""
    if len(ref) != len(completion_ids):
        raise ValueError(
            f"reference returned {len(ref)} positions for {len(completion_ids)} completion tokens"
        )
    out = []
    for t, (tok, dist) in enumerate(zip(completion_ids, ref)):
        top = max(dist.values()) if dist else -math.inf
        lp = dist.get(tok, -math.inf)
        rank = 1 + sum(1 for v in dist.values() if v > lp) if tok in dist else top_k + 1
        gap = min(1.0, max(0.0, math.exp(top) - (math.exp(lp) if lp > -math.inf else 0.0)))
        out.append(TokenCheck(t, int(tok), rank, lp, gap))
    return out


def _is_flagged(c: TokenCheck, greedy: bool, th: VerifyThresholds) -> bool:
    if greedy:
        return c.rank > 1 and c.gap > th.greedy_gap_tol
    return c.logprob < th.sampled_min_logprob


def structural_reasons(
    claim: Claim, ids: Sequence[int], ids_from_node: bool, codec: TextCodec, th: VerifyThresholds
) -> tuple[list[str], list[str]]:
    """(fraud reasons, fail reasons) that need no reference engine."""
    fraud, fail = [], []
    n = len(ids)
    if ids_from_node:
        body = [t for t in ids if t not in codec.eos_token_ids]
        # Byte-level BPE: a token may end mid-character; streaming detokenisers emit U+FFFD there while a
        # whole-sequence decode may not, so replacement characters are ignored in the comparison.
        if codec.decode(body).replace("\ufffd", "") != claim.text.replace("\ufffd", ""):
            fail.append("token ids do not decode to the returned text")
    if claim.reported_completion_tokens > n + th.count_tolerance:
        fraud.append(f"inflated token count: reported {claim.reported_completion_tokens}, verified {n}")
    if claim.max_tokens is None:
        return fraud, fail
    if claim.reported_completion_tokens > claim.max_tokens + th.count_tolerance:
        fraud.append(
            f"reported {claim.reported_completion_tokens} tokens beyond max_tokens {claim.max_tokens}"
        )
    if claim.finish_reason == "length" and n + th.count_tolerance < claim.max_tokens:
        fraud.append(f"truncated: finish_reason 'length' after {n} of max_tokens {claim.max_tokens}")
    return fraud, fail


def unverifiable_reasons(
    claim: Claim, ids: Sequence[int], codec: TextCodec, max_len: int | None
) -> list[str]:
    """Why a claim cannot even be put to the reference engine (node output outside what the claimed
    model can produce): ids out of the vocabulary, more ids than the request allowed or than the
    model's context holds. Each is fraud: an honest engine cannot emit it, and feeding it to the
    reference would fail the engine call (for every claim batched with it)."""
    out = []
    bad = [t for t in ids if not 0 <= t < codec.vocab_size]
    if bad:
        out.append(
            f"{len(bad)} token ids outside the model's vocabulary of {codec.vocab_size} (e.g. {bad[0]})"
        )
    if claim.max_tokens is not None and len(ids) > claim.max_tokens + 1:  # + 1: a trailing EOS id
        out.append(f"{len(ids)} token ids for max_tokens {claim.max_tokens}")
    if max_len is not None and len(claim.prompt_token_ids) + len(ids) > max_len:
        out.append(
            f"prompt + completion of {len(claim.prompt_token_ids) + len(ids)} ids exceed the context of {max_len}"
        )
    return out


def malformed(reason: str) -> Verification:
    """The verdict on output that cannot be verified at all (see `unverifiable_reasons`): fraud."""
    return Verification(
        "fraud", (reason,), greedy=False, n_tokens=0, flagged=0, max_gap=0.0, mean_logprob=0.0, tokens=()
    )


def verify(
    claim: Claim,
    engine: ReferenceEngine,
    codec: TextCodec,
    thresholds: VerifyThresholds | None = None,
    sampler: NoisyArgmax | None = None,
) -> Verification:
    """Verdict on one completion. Calls `engine.prompt_logprobs` once (blocking: run it off the event loop),
    unless the claim is unverifiable (fraud without an engine call). `sampler`: the nodes' seeded sampler
    (`scoring.replay`); with it, seeded sampled claims are checked token by token by replay, without it
    by the logprob floor."""
    th = thresholds or VerifyThresholds()
    ids_from_node = claim.completion_token_ids is not None
    ids = list(claim.completion_token_ids) if ids_from_node else codec.encode(claim.text)
    unverifiable = unverifiable_reasons(claim, ids, codec, getattr(engine, "max_model_len", None))
    if unverifiable:
        return malformed("; ".join(unverifiable))
    fraud, fail = structural_reasons(claim, ids, ids_from_node, codec, th)
    greedy = claim.temperature == 0.0
    # A natural 'stop' ends with EOS; when the node's ids leave it out, teach-force it to check the ending.
    check_ids = list(ids)
    eos_appended = False
    if (
        claim.finish_reason == "stop"
        and not claim.stop_strings
        and codec.eos_token_ids
        and not (check_ids and check_ids[-1] in codec.eos_token_ids)
    ):
        check_ids.append(min(codec.eos_token_ids))
        eos_appended = True
    ref = engine.prompt_logprobs(list(claim.prompt_token_ids), check_ids, th.top_k) if check_ids else []
    if eos_appended and ref:  # any EOS id counts: take the best one
        last = ref[-1]
        best = max(codec.eos_token_ids, key=lambda e: last.get(e, -math.inf))
        check_ids[-1] = best
    checks = compare_tokens(check_ids, ref, th.top_k)
    replayed = not greedy and claim.seed is not None and not claim.reshaped and sampler is not None
    unsure = 0
    if replayed:
        steps = replay_steps(
            ref, check_ids, claim.temperature, claim.seed, codec.vocab_size, sampler, th.replay_tol
        )
        flags = [st == "bad" for st in steps]
        unsure = steps.count("unsure")
    else:
        flags = [_is_flagged(c, greedy, th) for c in checks]
    flagged = sum(flags)
    if eos_appended and flags and flags[-1]:
        fraud.append("finish_reason 'stop' where the claimed model would not stop (truncated output)")
        flagged -= 1
    body_n = len(checks) - (1 if eos_appended else 0)
    rate = flagged / body_n if body_n else 0.0
    if replayed:
        fail_rate, fraud_rate, kind = (
            th.replay_fail_rate,
            th.replay_fraud_rate,
            "not what the seeded sampler picks",
        )
    elif greedy:
        fail_rate, fraud_rate, kind = th.greedy_fail_rate, th.greedy_fraud_rate, "mismatched"
    else:
        fail_rate, fraud_rate, kind = th.sampled_fail_rate, th.sampled_fraud_rate, "implausible"
    if rate > fraud_rate:
        fraud.append(
            f"{flagged}/{body_n} tokens {kind} under the reference (> {fraud_rate:.3f}): another model"
        )
    elif rate > fail_rate:
        fail.append(f"{flagged}/{body_n} tokens {kind} under the reference (> {fail_rate:.3f})")
    verdict: Verdict = "fraud" if fraud else ("fail" if fail else "pass")
    finite = [c.logprob for c in checks if c.logprob > -math.inf]
    return Verification(
        verdict=verdict,
        reasons=tuple(fraud + fail),
        greedy=greedy,
        n_tokens=body_n,
        flagged=max(0, flagged),
        max_gap=max((c.gap for c in checks if c.rank > 1), default=0.0),
        mean_logprob=sum(finite) / len(finite) if finite else 0.0,
        tokens=tuple(checks),
        replayed=replayed,
        unsure=unsure,
    )


def calibrate(
    honest_greedy: Sequence[Sequence[TokenCheck]],
    honest_sampled: Sequence[Sequence[TokenCheck]] = (),
    *,
    margin: float = 3.0,
    base: VerifyThresholds | None = None,
    note: str = "",
) -> VerifyThresholds:
    """Thresholds that accept every honest sample with room to spare.

    honest_*: per completion, the token checks of an honest node's output under the reference
    (`compare_tokens`), gathered at several batch sizes / concurrency levels so that the engine's
    nondeterminism shows. The greedy near-tie tolerance becomes `margin` x the largest honest gap at a
    non-argmax token (at least 1e-3); the fail rates become `margin` x the worst honest rate under the
    new tolerance (0 when honest nodes never mismatch, i.e. any mismatch fails); the sampled logprob
    floor sits log(margin^2) below the least likely honest sampled token, and the sampled fail rate
    keeps `base`'s allowance (sampling can hit a rare token by pure chance). Fraud rates are kept from
    `base` but never below the fail rates.
    """
    if margin < 1.0:
        raise ValueError("margin must be >= 1 (it widens the honest envelope)")
    base = base or VerifyThresholds()
    gaps = [c.gap for comp in honest_greedy for c in comp if c.rank > 1]
    gap_tol = min(1.0, max(1e-3, margin * max(gaps, default=0.0)))

    def worst_rate(comps, flag) -> float:
        return max((sum(flag(c) for c in comp) / len(comp) for comp in comps if comp), default=0.0)

    g_rate = worst_rate(honest_greedy, lambda c: c.rank > 1 and c.gap > gap_tol)
    lps = [c.logprob for comp in honest_sampled for c in comp]
    floor = (min(lps) - 2 * math.log(margin)) if lps else base.sampled_min_logprob
    floor = min(floor, base.sampled_min_logprob) if math.isfinite(floor) else base.sampled_min_logprob
    s_rate = worst_rate(honest_sampled, lambda c: c.logprob < floor)
    n_tok = sum(len(c) for c in honest_greedy) + sum(len(c) for c in honest_sampled)
    prov = (
        f"calibrated from {len(honest_greedy)} greedy + {len(honest_sampled)} sampled honest completions "
        f"({n_tok} tokens), margin {margin}: max honest near-tie gap {max(gaps, default=0.0):.2e}, "
        f"min honest sampled logprob {min(lps, default=float('nan')):.2f}. {note}"
    ).strip()
    g_fail = min(1.0, margin * g_rate)
    s_fail = min(1.0, margin * s_rate)
    return base.model_copy(
        update={
            "greedy_gap_tol": gap_tol,
            "greedy_fail_rate": g_fail,
            "greedy_fraud_rate": max(base.greedy_fraud_rate, g_fail),
            "sampled_min_logprob": floor,
            "sampled_fail_rate": max(s_fail, base.sampled_fail_rate),
            "sampled_fraud_rate": max(base.sampled_fraud_rate, s_fail),
            "provenance": prov,
        }
    )

"""Model-identity verification of one completion, pure: no engine, no network.

The validator re-runs the node's completion through a trusted reference engine of the claimed model,
teacher-forced (prompt + the node's completion as one prompt, `prompt_logprobs=k`), so for every
completion position t it knows the reference's next-token distribution given exactly the node's prefix.
Divergence earlier in the text therefore never cascades: each token is judged on its own prefix.

Honest nodes are not bit-identical to the reference: other kernels, instruction sets, dtypes (bf16 vs
fp32), thread counts and batch shapes move every logit by a little float noise, and where two tokens
are nearly tied that noise flips the choice. So each token is judged by its *margin*, in nats of the
reference's logits (= logprob differences):

* Greedy (temperature 0): m_t = logprob_ref(top-1) - logprob_ref(emitted) >= 0. An honest node's
  token loses only near-ties (small m_t); another model, a quantised one or a cheat emits tokens that
  lose by a lot. A token is a *violation* when m_t > `margin_tol`.
* Sampled with a seed and a known node sampler (`scoring.replay`): the seed fixes the sampler's Gumbel
  noise, so the emitted token must win argmax(logits/T + g). The emitted token gets `margin_tol`/T of
  headroom (the same logit noise, in the sampler's units); a token that still loses is a violation,
  positions an unreported (outside top-k) token might have won are "unsure" and not counted.
* Structured output (`response_format` json_schema / json_object): the node decoded under a grammar
  that masks tokens, so the validator replays the same mask (`scoring.grammar`) and measures margins
  against the best *allowed* token; a token the grammar rejects is a violation, and judging stops there.
  Sampled answers under a grammar take the floor below, over the allowed tokens (no exact replay).
* Other sampled requests (no seed, top_p/top_k/penalties, or no replayable sampler): any token may
  appear, so a token is a violation only if its *tempered* reference logprob (an upper bound from the
  top-k) is below `sampled_min_logprob`; an honest sampler emits such a token with probability at most
  vocab_size x e^floor, which the floor is kept under (see `floor_for`).

Each completion yields `Evidence`: tokens judged, violations, and the log-likelihood ratio of its
violations under a Bernoulli model, H1 (a cheat: violation rate >= `cheat_rate`) against H0 (honest
noise: rate <= `honest_rate`). It also counts *flips*: tokens other than the reference's top choice
that stay inside the tolerance. Honest noise flips only near-ties (1.6-1.8% of tokens for bfloat16 nodes
against a float32 reference); a node that takes the runner-up whenever the tolerance allows flips ~26%,
and its violations alone never show it. So flips of greedy tokens get a second Bernoulli test
(`honest_flip_rate` against `cheat_flip_rate`). Replayed samples count no flips: the sampler's noise
makes near-ties common, and honest bfloat16 samples differ from the exact replay on 14% of tokens. One completion decides nothing: `scoring.score.NodeScorer` runs a sequential test
(CUSUM) on each over a node's completions, with a stated false-conviction bound for the two together.

Immediate fraud (deterministic: no noise explains it): reported counts above the verified count
(inflation), `finish_reason="length"` with fewer than max_tokens tokens (truncation), a 'stop' where the
claimed model would not stop, ids outside the vocabulary, ids that do not decode to the returned text;
and a completion whose violations are so many that honest noise cannot explain them (binomial tail
under `honest_rate` below `fraud_alpha` and rate above `fraud_rate`): another model.

Verdicts, per completion, for counters and logs: `pass` (its evidence favours honest noise, LLR <= 0),
`fail` (it favours a cheat, LLR > 0: evidence for the sequential test, no conviction by itself),
`fraud` (above). The thresholds are `scoring.thresholds.VerifyThresholds`; `calibrate` there derives
`margin_tol` and `honest_rate` from honest completions where node and reference differ (dtype,
threads, batch, prefix caching), with a stated margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cluster.records import MAX_SHADOW_SCHEMA, ToolUse
from cluster.structured import same_calls, tool_calls_match
from scoring.grammar import GrammarWalk, JsonGrammar
from scoring.replay import NoisyArgmax, replay_steps
from scoring.thresholds import VerifyThresholds

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

    def encode_chat(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
        """Ids of a chat prompt (template with the request's tools + generation prompt); used by
        validators."""
        ...

    def grammar(self) -> JsonGrammar | None:
        """The model's structured-output grammar (None: structured answers cannot be replayed)."""
        ...

    def tool_parser(self, name: str) -> Any | None:
        """vLLM's tool parser `name` over this tokenizer (None: auto tool calls cannot be replayed)."""
        ...


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) >= k), summed in log space (n up to a few thousand)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one completion says about its node, for the sequential test (`scoring.score`)."""

    tokens: int  # tokens judged (unsure replay positions and an appended EOS excluded)
    violations: int  # of those, tokens honest noise does not explain (margin > tol)
    llr: float  # log-likelihood ratio cheat vs honest of these counts (VerifyThresholds.llr)
    fraud: bool = False  # structural lie or certainly another model: conviction without a test
    flips: int = 0  # tokens other than the reference's top choice but inside the tolerance
    flip_llr: float = 0.0  # the second test's log-likelihood ratio (VerifyThresholds.flip_llr)

    @classmethod
    def of_verdict(cls, verdict: str, th: VerifyThresholds | None = None) -> Evidence:
        """Evidence of a bare verdict (callers without token counts): 'pass' is no evidence either way,
        'fail' one violation, 'fraud' fraud."""
        th = th or VerifyThresholds()
        if verdict == "fraud":
            return cls(0, 0, 0.0, fraud=True)
        if verdict == "fail":
            return cls(1, 1, th.llr(1, 1))
        if verdict == "pass":
            return cls(0, 0, 0.0)
        raise ValueError(f"unknown verdict {verdict!r}; expected pass, fail or fraud")


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
    json_schema: str | None = Field(
        default=None,
        max_length=MAX_SHADOW_SCHEMA,
        description="The JSON schema the answer was decoded under (cluster.structured); None: free text.",
    )
    tool_use: ToolUse | None = Field(
        default=None,
        description="A named or required tool call: the client got `tool_use.calls`, vLLM's parse of the ids, "
        "instead of `text`.",
    )


@dataclass(frozen=True, slots=True)
class TokenCheck:
    position: int
    token_id: int
    rank: int  # 1 = reference argmax; top_k + 1 when outside the returned top-k
    logprob: float  # reference logprob of the emitted token (-inf when unknown)
    margin: float  # logprob_ref(top-1) - logprob_ref(emitted) >= 0 (a lower bound outside the top-k)


@dataclass(frozen=True, slots=True)
class Verification:
    verdict: Verdict
    reasons: tuple[str, ...]
    greedy: bool
    n_tokens: int  # tokens judged (replay: without the unsure positions)
    flagged: int  # violations: tokens whose margin honest noise does not explain
    max_margin: float  # largest margin of a non-argmax token (nats)
    mean_logprob: float
    tokens: tuple[TokenCheck, ...]
    replayed: bool = False  # sampled and checked by seeded replay (flagged = tokens the sampler forbids)
    unsure: int = 0  # replayed positions an unreported (outside top-k) token might have won
    evidence: Evidence = Evidence(0, 0, 0.0)

    @property
    def flagged_rate(self) -> float:
        return self.flagged / self.n_tokens if self.n_tokens else 0.0


def allowed_only(
    dist: dict[int, float], position: int, tok: int, walk: GrammarWalk | None
) -> dict[int, float]:
    """The reference's known tokens at `position` that the grammar allowed (and the emitted one)."""
    if walk is None:
        return dist
    return {k: v for k, v in dist.items() if k == tok or walk.allows(position, k)}


def compare_tokens(
    completion_ids: Sequence[int],
    ref: Sequence[dict[int, float]],
    top_k: int,
    walk: GrammarWalk | None = None,
) -> list[TokenCheck]:
    """Rank and margin of each emitted token in the reference distribution at its position (among the
    tokens the grammar allowed there, under a `walk`)."""
    if len(ref) != len(completion_ids):
        raise ValueError(
            f"reference returned {len(ref)} positions for {len(completion_ids)} completion tokens"
        )
    out = []
    for t, (tok, full) in enumerate(zip(completion_ids, ref)):
        dist = allowed_only(full, t, tok, walk)
        top = max(dist.values()) if dist else 0.0
        lp = dist.get(tok, -math.inf)
        rank = 1 + sum(1 for v in dist.values() if v > lp) if tok in dist else top_k + 1
        # Outside the returned top-k the emitted token is at most the k-th value: a lower bound.
        known = lp if lp > -math.inf else min(dist.values(), default=0.0)
        out.append(TokenCheck(t, int(tok), rank, lp, max(0.0, top - known)))
    return out


def _tempered_logprob(dist: dict[int, float], tok: int, temperature: float) -> float:
    """Upper bound of log p_T(tok) (the sampler's distribution at temperature T) from the top-k: the
    normaliser over the known tokens only is a lower bound of the full one."""
    lp = dist.get(tok, -math.inf)
    if lp == -math.inf:
        return -math.inf
    scaled = [v / temperature for v in dist.values()]
    top = max(scaled)
    return lp / temperature - (top + math.log(sum(math.exp(x - top) for x in scaled)))


def structural_reasons(
    claim: Claim, ids: Sequence[int], ids_from_node: bool, codec: TextCodec, th: VerifyThresholds
) -> tuple[list[str], list[str]]:
    """(fraud reasons, fail reasons) that need no reference engine: deterministic lies, which no float
    noise explains, are fraud."""
    fraud, fail = [], []
    n = len(ids)
    if ids_from_node:
        body = [t for t in ids if t not in codec.eos_token_ids]
        # Byte-level BPE: a token may end mid-character; streaming detokenisers emit U+FFFD there while a
        # whole-sequence decode may not, so replacement characters are ignored in the comparison.
        decoded, text = codec.decode(body).replace("\ufffd", ""), claim.text.replace("\ufffd", "")
        use = claim.tool_use
        if use is not None:
            fraud += tool_call_reasons(claim, use, decoded, codec)
        # A stop string ends the text inside the ids' last tokens: the text is then a prefix.
        elif decoded != text and not (claim.stop_strings and decoded.startswith(text)):
            fraud.append("token ids do not decode to the returned text")
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


def tool_call_reasons(claim: Claim, use: ToolUse, decoded: str, codec: TextCodec) -> list[str]:
    """Fraud reasons of an answer to a request with tools: the client got vLLM's reading of the node's
    tokens (`decoded`, their text), so its content and calls must be exactly that reading. Named and
    required calls: no content, the calls `tool_calls_match` says; auto: what the nodes' tool parser
    makes of the text (content, calls). A streamed required call cut by max_tokens is sent as partial
    calls while it arrives: only its content is checked."""
    text = claim.text.replace("\ufffd", "")
    calls = tuple((name, args.replace("\ufffd", "")) for name, args in use.calls)
    content, parsed = auto_reading(use, decoded, codec) if use.mode == "auto" else ("", None)
    if text != content + "".join(name + args for name, args in calls):
        return ["the answer's content is not what vLLM makes of its token ids"]
    if parsed is not None:
        return (
            []
            if same_calls(parsed, calls)
            else ["the tool calls the client got are not what the token ids say"]
        )
    if use.mode == "required" and claim.finish_reason == "length":
        return []
    if not tool_calls_match(use.mode, use.name, decoded, calls):
        return ["the tool calls the client got are not what the token ids say"]
    return []


def auto_reading(use: ToolUse, decoded: str, codec: TextCodec) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(content, calls) the nodes' tool parser makes of an auto answer's text, as vLLM's chat serving
    keeps them (vllm/parser/abstract_parser.py): the calls and what content is left (none if blank), or
    the whole text and no calls."""
    parser = codec.tool_parser(use.parser) if use.parser else None
    if parser is None:
        raise ValueError("no tool parser to replay an auto tool call with")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": ""}], tools=list(use.tools), tool_choice="auto"
    )
    info = parser.extract_tool_calls(decoded, request)
    if not info.tools_called:
        return decoded, ()
    content = info.content if info.content and info.content.strip() else ""
    return content, tuple((c.function.name, c.function.arguments) for c in info.tool_calls)


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
        "fraud",
        (reason,),
        greedy=False,
        n_tokens=0,
        flagged=0,
        max_margin=0.0,
        mean_logprob=0.0,
        tokens=(),
        evidence=Evidence(0, 0, 0.0, fraud=True),
    )


def verify(
    claim: Claim,
    engine: ReferenceEngine,
    codec: TextCodec,
    thresholds: VerifyThresholds | None = None,
    sampler: NoisyArgmax | None = None,
) -> Verification:
    """Verdict and evidence on one completion. Calls `engine.prompt_logprobs` once (blocking: run it off
    the event loop), unless the claim is unverifiable (fraud without an engine call). `sampler`: the
    nodes' seeded sampler (`scoring.replay`); with it, seeded sampled claims are checked token by token
    by replay, without it by the tempered logprob floor."""
    th = thresholds or VerifyThresholds()
    ids_from_node = claim.completion_token_ids is not None
    if claim.tool_use is not None and not ids_from_node:
        # the client got vLLM's parse of the ids, not their text: without them there is nothing to replay
        raise ValueError("a tool call without the node's token ids cannot be checked")
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
    walk = None
    if claim.json_schema is not None:
        grammar = codec.grammar()
        if grammar is None:
            raise ValueError("no grammar for this model: structured output cannot be replayed")
        walk = grammar.walk(claim.json_schema, check_ids, [d.keys() for d in ref])
    checks = compare_tokens(check_ids, ref, th.top_k, walk)
    replayed = (
        not greedy and claim.seed is not None and not claim.reshaped and walk is None and sampler is not None
    )
    judged: list[bool] = [True] * len(checks)
    if replayed:
        # The same logit noise as greedy, in the sampler's units (logits / T).
        steps = replay_steps(
            ref,
            check_ids,
            claim.temperature,
            claim.seed,
            codec.vocab_size,
            sampler,
            th.margin_tol / claim.temperature,
        )
        flags = [st == "bad" for st in steps]
        judged = [st != "unsure" for st in steps]
        # No flips: the sampler's Gumbel noise makes near-ties common, so honest bf16 samples differ from
        # the exact replay on 14% of tokens (84/587 in tests/integration/test_scoring_reference.py)
        flipped = [False] * len(flags)
        kind = "not what the seeded sampler picks"
    elif greedy:
        flags = [c.margin > th.margin_tol for c in checks]
        flipped = [c.rank > 1 and not f for c, f in zip(checks, flags)]
        kind = f"lose the reference's argmax by more than {th.margin_tol:.3g} nats"
    else:
        floor = th.floor_for(codec.vocab_size)
        flags = [
            _tempered_logprob(allowed_only(d, c.position, c.token_id, walk), c.token_id, claim.temperature)
            < floor
            for d, c in zip(ref, checks)
        ]
        flipped = [False] * len(flags)  # any token may be sampled: no flips to count
        kind = f"below the tempered logprob floor {floor:.1f}"
    if walk is not None:
        # A token the grammar forced (the only one allowed) says nothing about the model: not judged.
        judged = [j and not walk.is_forced(t) for t, j in enumerate(judged)]
    if walk is not None and walk.rejected_at is not None:
        # No honest node emits a token its grammar masks; past it the grammar's state is unknown.
        r = walk.rejected_at
        flags[r] = True
        judged = [t < r and j for t, j in enumerate(judged)]
        judged[r] = True
        fail.append(f"token {r} is outside the response format's grammar")
    # After a rejected token nothing is known of the grammar: the ending is judged only up to it.
    ending_known = walk is None or walk.rejected_at in (None, len(flags) - 1)
    if eos_appended and flags and flags[-1] and ending_known:
        fraud.append("finish_reason 'stop' where the claimed model would not stop (truncated output)")
    if eos_appended:  # the appended EOS was judged for the ending above; it is not the node's token
        flags, judged, flipped = flags[:-1], judged[:-1], flipped[:-1]
    n = sum(judged)
    flagged = sum(f for f, j in zip(flags, judged) if j)
    flips = sum(f for f, j in zip(flipped, judged) if j)
    # flips feed only the sequential test: one near-tie in a short answer is common for honest nodes
    flip_llr = th.flip_llr(n, flips) if greedy else 0.0
    tail = binomial_tail(n, flagged, th.honest_rate)
    if flagged and flagged > th.fraud_rate * n and tail < th.fraud_alpha:
        fraud.append(f"{flagged}/{n} tokens {kind}: P < {tail:.1e} under honest noise, another model")
    llr = th.llr(n, flagged)
    if llr > 0 and flagged:
        fail.append(f"{flagged}/{n} tokens {kind} (evidence against the node: LLR {llr:+.1f})")
    verdict: Verdict = "fraud" if fraud else ("fail" if fail else "pass")
    finite = [c.logprob for c in checks if c.logprob > -math.inf]
    return Verification(
        verdict=verdict,
        reasons=tuple(fraud + fail),
        greedy=greedy,
        n_tokens=n,
        flagged=flagged,
        max_margin=max((c.margin for c in checks), default=0.0),
        mean_logprob=sum(finite) / len(finite) if finite else 0.0,
        tokens=tuple(checks),
        replayed=replayed,
        unsure=len(judged) - n,
        evidence=Evidence(n, flagged, llr, fraud=bool(fraud), flips=flips, flip_llr=flip_llr),
    )

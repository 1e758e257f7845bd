"""A validator: challenge nodes through the gateway, verify answers, keep scores. I/O is injected.

    send(ChallengeRequest) -> ChallengeResponse   async; `scoring.challenge_client.http_send(...)` is the
                                                   real one (gateway, headers x-meritnet-node +
                                                   x-meritnet-challenge-key)
    engines[model_id] : ReferenceEngine            its own trusted engine per model (scoring.reference; an
                                                   embeddings model's has `embed`: scoring.embeddings)
    codecs[model_id]  : TextCodec                  the claimed model's tokenizer

`Validator` is plain asyncio (unit-testable with fakes); deploy's `ValidatorActor` (deploy/scoring.py)
is the thin Ray wrapper that builds the real I/O and runs the loops under `supervise`. Scores leave as
`NodeScore`s; `scoring.consensus.ConsensusState` turns several validators' scores into `QualityScores`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.records import NodeScore, NodeStats, ServedCompletion, ServedEmbedding
from scoring import metrics
from scoring.challenge import ChallengeConfig, ChallengePool, ChallengeRequest, ShadowSampler
from scoring.challenge_client import EMBEDDINGS_PATH, ChallengeResponse, SendFn
from scoring.embeddings import EmbeddingThresholds, verify_embeddings
from scoring.organic import shape_of
from scoring.replay import RESHAPING_FIELDS, NoisyArgmax, resolve_sampler
from scoring.score import NodeScorer, ScoreConfig
from scoring.thresholds import VerifyThresholds
from scoring.verify import Claim, ReferenceEngine, TextCodec, Verification, malformed, verify

log = logging.getLogger("meritnet.validator")

GRAMMAR_COMPILE_S = 10.0  # the longest a client's response schema may take to compile for a shadow check


class ValidatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    validator_id: str = Field(
        min_length=1, description="This validator's identity (a row of the weight matrix)."
    )
    challenge: ChallengeConfig = Field(default_factory=ChallengeConfig, description="Challenge traffic.")
    thresholds: VerifyThresholds = Field(
        default_factory=VerifyThresholds, description="Verification thresholds."
    )
    score: ScoreConfig = Field(
        default_factory=ScoreConfig,
        description="Score smoothing and the sequential test (conviction threshold, backoff).",
    )
    embedding: EmbeddingThresholds = Field(
        default_factory=EmbeddingThresholds, description="Where an embedding stops being honest noise."
    )
    timeout_s: float = Field(
        default=60.0, gt=0, description="A challenge unanswered this long counts as failed."
    )
    node_sampler: Literal["auto", "vllm-cpu", "numpy", "none"] = Field(
        default="auto",
        description="The nodes' seeded sampler, replayed to verify sampled completions token by token "
        "(scoring.replay): 'vllm-cpu' (vLLM's CPU Gumbel sampler), 'numpy' (the fakes), 'none' (sampled "
        "output gets the logprob floor only); 'auto': the reference engine's `node_sampler` if it declares one, "
        "else vllm-cpu where this machine's vLLM has that kernel. GPU nodes sample differently: set 'none' "
        "for a fleet with GPU nodes.",
    )


@dataclass(frozen=True, slots=True)
class ChallengeOutcome:
    node_id: str
    response: ChallengeResponse
    verification: Verification | None


class Validator:
    def __init__(
        self,
        config: ValidatorConfig,
        send: SendFn,
        engines: Mapping[str, ReferenceEngine],
        codecs: Mapping[str, TextCodec],
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._send = send
        self._engines = dict(engines)
        self._codecs = dict(codecs)
        self.pool = ChallengePool(config.challenge, rng)
        # The nodes' seeded sampler per model: an explicit config wins; on 'auto' an engine that declares
        # `node_sampler` (the fakes) decides, else vLLM's CPU sampler where this machine has it.
        # Resolved on first use: 'auto' may import vLLM, which engines that declare theirs never need.
        self._samplers: dict[str, NoisyArgmax | None] = {}
        self.scorer = NodeScorer(config.validator_id, config.score)
        self.shadow = ShadowSampler(
            config.challenge.shadow_rate, config.challenge.shadow_key.get_secret_value()
        )
        self.tokens_spent = 0  # prompt + completion tokens of challenges + reference prefill (overhead)
        self._engine_lock = asyncio.Lock()  # one teacher-forced prefill at a time per validator
        # Audit counters per node: challenges, answered, and verdicts (pass/fail/fraud, challenge or shadow).
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # node -> verifications it took until its integrity first fell to 0 (the penalty), for audits.
        self.detected_after: dict[str, int] = {}

    @property
    def validator_id(self) -> str:
        return self.config.validator_id

    def _prompt_ids(self, model: str, messages, prompt: str | None, tools=None) -> tuple[int, ...]:
        """Prompt ids under the claimed model's tokenizer (chat template for messages, with tools)."""
        codec = self._codecs[model]
        if messages is not None:
            return tuple(codec.encode_chat([dict(m) for m in messages], list(tools) if tools else None))
        return tuple(codec.encode_prompt(prompt or ""))

    def sampler_for(self, model_id: str) -> NoisyArgmax | None:
        """The nodes' seeded sampler for `model_id` (None: sampled output cannot be replayed)."""
        if model_id not in self._samplers:
            engine = self._engines.get(model_id)
            if self.config.node_sampler == "auto" and hasattr(engine, "node_sampler"):
                self._samplers[model_id] = engine.node_sampler
            else:
                self._samplers[model_id] = resolve_sampler(self.config.node_sampler)
        return self._samplers[model_id]

    def claim_for(self, req: ChallengeRequest, resp: ChallengeResponse) -> Claim:
        return Claim(
            prompt_token_ids=self._prompt_ids(req.model, req.messages, req.prompt),
            text=resp.text,
            completion_token_ids=resp.token_ids,
            reported_completion_tokens=resp.completion_tokens,
            finish_reason=resp.finish_reason,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            stop_strings="stop" in req.body,
            seed=req.body.get("seed"),
            reshaped=any(k in req.body for k in RESHAPING_FIELDS),
        )

    async def verify_claim(self, model_id: str, claim: Claim) -> Verification:
        engine = self._engines.get(model_id)
        if engine is None:
            raise KeyError(
                f"validator {self.validator_id} has no reference engine for model {model_id!r}; "
                "configure one per served model"
            )
        codec, sampler = self._codecs[model_id], self.sampler_for(model_id)
        grammar = codec.grammar() if claim.json_schema is not None else None
        if grammar is not None:
            # A client's schema is compiled off the engine lock, within a time limit (else no verdict:
            # TimeoutError); verify() then finds it in the grammar's cache.
            await asyncio.wait_for(asyncio.to_thread(grammar.compiled, claim.json_schema), GRAMMAR_COMPILE_S)
        v = await self._on_engine(engine, verify, claim, engine, codec, self.config.thresholds, sampler)
        self.tokens_spent += len(claim.prompt_token_ids) + v.n_tokens
        return v

    async def _on_engine(self, engine: Any, fn: Callable, *args: Any) -> Any:
        """`fn(*args)` in a worker thread, using `engine`: a local vLLM engine takes one call at a time;
        an engine that says it batches concurrent calls (deploy's shared engine actors) gets them at once."""
        lock = contextlib.nullcontext() if getattr(engine, "concurrent_calls", False) else self._engine_lock
        async with lock:
            return await asyncio.to_thread(fn, *args)

    def _no_verdict(self, node_id: str, exc: Exception) -> None:
        """This validator's own engine failed: no verdict on the node (counted, logged), never a crash."""
        self.counts[node_id]["verify_error"] += 1
        metrics.VERIFY_ERRORS.labels(self.validator_id).inc()
        log.warning("validator %s: could not verify %s (%s)", self.validator_id, node_id, type(exc).__name__)

    def _challenge_for(self, node: NodeStats) -> ChallengeRequest:
        """A challenge drawn like organic traffic; for an embeddings node, its texts as the inputs."""
        embed = node.task == "embed"
        req = self.pool.sample(
            node.node_id, node.model_id, replayable=not embed and self.sampler_for(node.model_id) is not None
        )
        if not embed:
            return req
        texts = [req.prompt] if req.prompt is not None else [m.get("content") for m in req.messages or ()]
        texts = [t for t in texts if isinstance(t, str) and t] or ["hello"]
        body = {"model": node.model_id, "input": texts, "encoding_format": "float"}
        return ChallengeRequest(node.node_id, node.model_id, EMBEDDINGS_PATH, body)

    async def challenge_once(self, node: NodeStats) -> ChallengeOutcome:
        """Send one challenge to `node`, verify the answer, update the scores."""
        req = self._challenge_for(node)
        try:
            resp = await asyncio.wait_for(self._send(req), self.config.timeout_s)
        except Exception as exc:  # noqa: BLE001 - unreachable node = unavailable, not a crash
            resp = ChallengeResponse(ok=False, error=type(exc).__name__)
            log.warning(
                "validator %s: challenge to %s failed (%s)",
                self.validator_id,
                node.node_id,
                type(exc).__name__,
            )
        verification = None
        tps = None
        if resp.ok and resp.elapsed_s > (resp.ttft_s or 0) and resp.completion_tokens > 1:
            tps = (resp.completion_tokens - 1) / (resp.elapsed_s - (resp.ttft_s or 0))
        self.scorer.observe_challenge(node.node_id, node.model_id, resp.ok, resp.ttft_s, tps)
        self.counts[node.node_id]["challenges"] += 1
        if resp.ok:
            self.counts[node.node_id]["answered"] += 1
            self.tokens_spent += resp.completion_tokens
            if resp.malformed:
                verification = malformed(resp.malformed)
                self._observe(node.node_id, node.model_id, verification)
            elif resp.vectors is not None:
                verification = await self._judge_vectors(
                    node.node_id, node.model_id, req.body["input"], resp.vectors
                )
            else:
                verification = await self._judge(
                    node.node_id, node.model_id, lambda: self.claim_for(req, resp)
                )
            if verification is not None and verification.verdict != "pass":
                log.warning(
                    "validator %s: node %s %s (%s)",
                    self.validator_id,
                    node.node_id,
                    verification.verdict,
                    "; ".join(verification.reasons)[:300],
                )
        self._export()
        return ChallengeOutcome(node.node_id, resp, verification)

    async def _judge(
        self, node_id: str, model_id: str, make_claim: Callable[[], Claim]
    ) -> Verification | None:
        """Verify what a node returned and record the verdict. Node output that does not even make a
        well-typed claim is fraud; a failure of this validator's own engine is no verdict (counted,
        logged), never an exception that ends the caller's loop."""
        try:
            claim = make_claim()
        except (ValidationError, ValueError, TypeError) as exc:
            v = malformed(f"output that cannot be verified ({type(exc).__name__})")
        else:
            try:
                v = await self.verify_claim(model_id, claim)
            except Exception as exc:  # noqa: BLE001 - the reference's failure is not the node's
                self._no_verdict(node_id, exc)
                return None
        self._observe(node_id, model_id, v)
        return v

    async def _judge_vectors(
        self, node_id: str, model_id: str, inputs: Sequence[str], vectors: Sequence[Sequence[float]]
    ) -> Verification | None:
        """Recompute an embeddings answer's vectors (a challenge's or an organic one's) on this validator's
        own engine and judge the node's (scoring.embeddings); the engine's own failure is no verdict, as
        in `_judge`."""
        engine = self._engines[model_id]
        try:
            reference = await self._on_engine(engine, engine.embed, list(inputs))
        except Exception as exc:  # noqa: BLE001 - the reference's failure is not the node's
            self._no_verdict(node_id, exc)
            return None
        v = verify_embeddings(vectors, reference, self.config.embedding, self.config.thresholds)
        self.tokens_spent += len(inputs)
        self._observe(node_id, model_id, v)
        return v

    def _observe_organic(self, item: ServedCompletion) -> None:
        """An organic prompt joins the pool challenges draw from (its last user message, or its prompt)."""
        if item.messages is not None:
            self.pool.observe_organic(
                next((m["content"] for m in reversed(item.messages) if m["role"] == "user"), "")
            )
        elif item.prompt:
            self.pool.observe_organic(item.prompt)

    def claim_for_served(self, item: ServedCompletion) -> Claim:
        tools = item.tool_use.tools if item.tool_use is not None else None
        return Claim(
            prompt_token_ids=self._prompt_ids(item.model, item.messages, item.prompt, tools),
            text=item.text,
            completion_token_ids=item.token_ids,
            reported_completion_tokens=item.completion_tokens,
            finish_reason=item.finish_reason,
            max_tokens=item.max_tokens,
            temperature=item.temperature,
            stop_strings=item.stop_strings,
            seed=item.seed,
            reshaped=item.top_p not in (None, 1.0) or item.top_k not in (None, 0, -1),
            json_schema=item.json_schema,
            tool_use=item.tool_use,
        )

    async def shadow_verify(self, item: ServedCompletion | ServedEmbedding) -> Verification | None:
        """Verify an organic answer after the fact if it falls in this validator's shadow sample (and it
        has an engine for the model); None otherwise. A completion's prompt may seed challenges."""
        if item.model not in self._engines:
            return None
        embedding = isinstance(item, ServedEmbedding)
        if not embedding:
            self.pool.observe_shape(shape_of(item))  # parameters and lengths only: challenges copy the mix
        if not self.shadow.should_verify(item.request_id):
            return None
        if embedding:
            v = await self._judge_vectors(item.node_id, item.model, item.inputs, item.vectors)
        else:
            self._observe_organic(item)
            v = await self._judge(item.node_id, item.model, lambda: self.claim_for_served(item))
        if v is None:
            return None
        self.counts[item.node_id]["shadow"] += 1
        self.counts[item.node_id][f"shadow_{v.verdict}"] += 1
        if not embedding and item.json_schema is not None:
            self.counts[item.node_id]["shadow_json"] += 1  # judged under its replayed grammar
        if not embedding and item.tool_use is not None:
            self.counts[item.node_id]["shadow_tools"] += 1  # its tool calls checked against its ids
        if v.verdict != "pass":
            log.warning(
                "validator %s: node %s %s on an organic request (%s)",
                self.validator_id,
                item.node_id,
                v.verdict,
                "; ".join(v.reasons)[:300],
            )
        self._export()
        return v

    async def follow_shadow_feed(
        self,
        fetch: Callable[[int], Awaitable[tuple[list[ServedCompletion | ServedEmbedding], int]]],
        stop: asyncio.Event,
        poll_s: float = 1.0,
    ) -> None:
        """Verify the organic completions offered on a feed (`fetch(cursor) -> (items, next cursor)`)."""
        cursor = 0
        while not stop.is_set():
            try:
                items, cursor = await fetch(cursor)
            except Exception as exc:  # noqa: BLE001 - no feed (yet) or restarting: try again later
                log.debug("validator %s: shadow feed unavailable (%s)", self.validator_id, type(exc).__name__)
                items = []
            if items:
                results = await asyncio.gather(
                    *(self.shadow_verify(i) for i in items), return_exceptions=True
                )
                for r in results:
                    if isinstance(r, Exception):
                        log.warning(
                            "validator %s: shadow verification failed (%s)",
                            self.validator_id,
                            type(r).__name__,
                        )
                continue
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass

    def _observe(self, node_id: str, model_id: str, v: Verification) -> None:
        """Feed one completion's evidence (tokens judged, violations, LLR) to the sequential test."""
        self.scorer.observe_verification(node_id, model_id, v.evidence)
        counts = self.counts[node_id]
        counts[v.verdict] += 1
        if node_id not in self.detected_after and self.scorer.in_penalty(node_id):
            self.detected_after[node_id] = counts["pass"] + counts["fail"] + counts["fraud"]

    async def run(self, nodes: Callable[[], Awaitable[Sequence[NodeStats]]], stop: asyncio.Event) -> None:
        """Challenge every live node forever (until `stop`), each on its own Poisson clock.

        Each challenge runs as its own task, so a slow node (or a slow verification) never holds up the
        challenges of the others; a node with a challenge still in flight is not sent another."""
        due: dict[str, float] = {}
        in_flight: dict[str, asyncio.Task] = {}
        while not stop.is_set():
            now = time.monotonic()
            try:
                live = [n for n in await nodes() if n.live and n.model_id in self._engines]
            except Exception as exc:  # noqa: BLE001 - registry restarting: skip this round
                log.warning("validator %s: node list unavailable (%s)", self.validator_id, type(exc).__name__)
                live = []
            for n in live:
                due.setdefault(n.node_id, now + self.pool.next_delay())
            ready = [n for n in live if due[n.node_id] <= now and n.node_id not in in_flight]
            for n in ready:
                due[n.node_id] = now + self.pool.next_delay()
                task = asyncio.get_running_loop().create_task(self.challenge_once(n))
                in_flight[n.node_id] = task
                task.add_done_callback(lambda t, node=n.node_id: self._challenge_done(in_flight, node, t))
            wait = min((due[n.node_id] for n in live), default=now + 1.0) - time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), max(0.05, min(wait, 5.0)))
            except TimeoutError:
                pass
        for task in in_flight.values():
            task.cancel()

    def _challenge_done(self, in_flight: dict[str, asyncio.Task], node_id: str, task: asyncio.Task) -> None:
        in_flight.pop(node_id, None)
        if not task.cancelled() and task.exception() is not None:  # a bug, not the node: logged, loop goes on
            exc = task.exception()
            log.error(
                "validator %s: challenge to %s crashed (%s: %s)",
                self.validator_id,
                node_id,
                type(exc).__name__,
                exc,
            )

    def scores(self) -> list[NodeScore]:
        return self.scorer.scores()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per node: challenges, answered, pass/fail/fraud verdicts, shadow verifications, and
        `detected_after` (verifications until the first integrity drop) once it happened."""
        out = {n: dict(c) for n, c in self.counts.items()}
        for n, k in self.detected_after.items():
            out.setdefault(n, {})["detected_after"] = k
        return out

    def _export(self) -> None:
        for s in self.scorer.scores():
            metrics.observe_node_score(s)


async def supervise(
    validator_id: str,
    name: str,
    loop_fn: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    backoff_s: float = 1.0,
) -> None:
    """Run `loop_fn()` until `stop`; if it ever raises, log, count (`meritnet_validator_loop_restarts`)
    and start it again after a growing pause (capped at 30 s): a validator never goes silent."""
    pause = backoff_s
    while not stop.is_set():
        try:
            await loop_fn()
            return
        except Exception as exc:  # noqa: BLE001 - whatever killed it, the loop must come back
            metrics.LOOP_RESTARTS.labels(validator_id, name).inc()
            log.error(
                "validator %s: %s loop died (%s: %s); restarting in %.0f s",
                validator_id,
                name,
                type(exc).__name__,
                exc,
                pause,
            )
        try:
            await asyncio.wait_for(stop.wait(), pause)
        except TimeoutError:
            pause = min(30.0, pause * 2)

"""Verifying an embeddings node: the validator's own engine recomputes the vectors, and each of the node's
vectors is judged by its cosine similarity to the reference's.

A vector whose cosine is below `min_cosine` is a violation, fed to the same per-node sequential test as a
completion's tokens (`scoring.score`, one vector standing for one token); a vector below `fraud_cosine`,
or vectors of another width, convict at once. Honest nodes differ from the reference by float noise only
(dtype, thread count, kernels): calibrated in `benchmarks.embeddings` (RESULTS.md), where honest
heterogeneous engines stay far above `min_cosine` and another model's vectors far below `fraud_cosine`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from scoring.thresholds import VerifyThresholds
from scoring.verify import Evidence, Verification


class EmbeddingThresholds(BaseModel):
    """Where an embedding stops being honest float noise (defaults: benchmarks.embeddings, RESULTS.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_cosine: float = Field(
        default=0.999,
        gt=0.0,
        le=1.0,
        description="A node's vector with a lower cosine to the reference's is a violation. Honest engines "
        "that differ from the fp32 reference in dtype, threads, batch and ISA measured >= 0.99996 on the "
        "default model (25x below this in 1 - cosine); int4 and 5%-perturbed weights fall under it for "
        "every vector, int8 (>= 0.99978) does not: 0.9999 would catch int8 with a 2.5x margin only.",
    )
    fraud_cosine: float = Field(
        default=0.5,
        ge=-1.0,
        le=1.0,
        description="Below this the vector is another model's: fraud at once (another seed of the default "
        "model measured -0.17 to 0.1).",
    )


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors of one length (0 when either is all zeros)."""
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    return dot / norm if norm else 0.0


def verify_embeddings(
    node: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    th: EmbeddingThresholds,
    verify_th: VerifyThresholds,
) -> Verification:
    """The verdict on a node's vectors for inputs whose reference vectors are `reference`."""
    if len(node) != len(reference) or any(len(a) != len(b) for a, b in zip(node, reference, strict=False)):
        reason = "vectors of another count or width than the model's"
        return _verdict("fraud", (reason,), len(node), 0, 0.0, Evidence(0, 0, 0.0, fraud=True))
    sims = [cosine(a, b) for a, b in zip(node, reference, strict=True)]
    violations = sum(s < th.min_cosine for s in sims)
    fraud = any(s < th.fraud_cosine for s in sims)
    worst = min(sims, default=1.0)
    reasons = (f"cosine {worst:.4f} to the reference (pass >= {th.min_cosine})",) if violations else ()
    evidence = Evidence(len(sims), violations, verify_th.llr(len(sims), violations), fraud=fraud)
    verdict = "fraud" if fraud else ("fail" if violations else "pass")
    return _verdict(verdict, reasons, len(sims), violations, 1.0 - worst, evidence)


def _verdict(
    verdict: str, reasons: tuple[str, ...], n: int, flagged: int, distance: float, evidence: Evidence
) -> Verification:
    return Verification(
        verdict,  # type: ignore[arg-type]
        reasons,
        greedy=True,
        n_tokens=n,
        flagged=flagged,
        max_margin=distance,  # 1 - the worst cosine
        mean_logprob=0.0,
        tokens=(),
        evidence=evidence,
    )


class VllmEmbeddingReference:
    """A validator's trusted embeddings engine: the model run by vLLM as a pooling model, as embedding
    nodes run it (cluster/deployment.py EMBED_ENGINE_KWARGS)."""

    def __init__(self, model_source: str, engine_kwargs: Mapping[str, Any] | None = None) -> None:
        from vllm import LLM

        from cluster.deployment import EMBED_ENGINE_KWARGS

        # the nodes' engine settings, but a pooling model has no grammar to constrain
        kwargs = {k: v for k, v in (engine_kwargs or {}).items() if k != "structured_outputs_config"}
        self.llm = LLM(model=str(model_source), **{**kwargs, **EMBED_ENGINE_KWARGS})

    def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        return [list(o.outputs.embedding) for o in self.llm.embed(list(inputs), use_tqdm=False)]

"""What a node returns for an embeddings request, parsed strictly (the completions' twin is
cluster/completions.py): the gateway reads a node's vectors through `parse_embeddings` and nothing else.

A node's answer must carry exactly one vector per input, indexed 0..n-1, all of one length, in the
encoding the request asked for (a list of finite floats, or base64 of little-endian float32s), and
nothing beyond `MAX_DIMENSIONS` per vector. Anything else raises `ValueError` (pydantic's
ValidationError is one), which the gateway counts as a malformed answer against the node.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cluster.completions import NodeError, NodeUsage

MAX_INPUTS = 2048  # inputs of one request (OpenAI's own cap), so vectors of one answer
MAX_DIMENSIONS = 1 << 16  # far above any embedding model's width


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)


Vector = Annotated[list[float], Field(min_length=1, max_length=MAX_DIMENSIONS)]
Base64Vector = Annotated[str, Field(min_length=1, max_length=(MAX_DIMENSIONS * 4 // 3) + 4)]


class NodeEmbedding(_Strict):
    index: int = Field(ge=0, lt=MAX_INPUTS)
    embedding: Vector | Base64Vector


class NodeEmbeddings(_Strict):
    """A node's whole embeddings answer (or its error), as far as the network reads it."""

    data: list[NodeEmbedding] = Field(default_factory=list, max_length=MAX_INPUTS)
    usage: NodeUsage | None = None
    error: NodeError | None = None


def _vector(embedding: list[float] | str) -> np.ndarray:
    """One vector as float32s: JSON floats as they are (finite already: allow_inf_nan), base64 decoded
    once; ValueError for base64 that is not whole float32s or holds NaN or infinity."""
    if isinstance(embedding, list):
        return np.asarray(embedding, dtype=np.float32)
    try:
        raw = base64.b64decode(embedding, validate=True)
    except binascii.Error:
        raise ValueError("an embedding that is not base64") from None
    if len(raw) % 4:
        raise ValueError("a base64 embedding that is not whole float32s")
    vector = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(vector).all():
        raise ValueError("a base64 embedding holds NaN or infinity")
    return vector


def parse_embeddings(raw: str | bytes, inputs: int, encoding: str) -> NodeEmbeddings:
    """A node's answer to a request of `inputs` inputs in `encoding` ('float' or 'base64'), checked:
    one vector per input, indices 0..inputs-1 once each, one length, the requested encoding, every
    float finite. An error answer is returned as it is (the gateway decides whose fault it is)."""
    body = NodeEmbeddings.model_validate_json(raw)
    if body.error is not None:
        return body
    if sorted(e.index for e in body.data) != list(range(inputs)):
        raise ValueError(f"{len(body.data)} vectors, or not indexed 0..{inputs - 1}, for {inputs} inputs")
    want = list if encoding == "float" else str
    if not all(isinstance(e.embedding, want) for e in body.data):
        raise ValueError(f"vectors not in the requested {encoding} encoding")
    if len({len(_vector(e.embedding)) for e in body.data}) > 1:
        raise ValueError("vectors of different lengths in one answer")
    return body


def vectors_of(answer: NodeEmbeddings) -> list[np.ndarray]:
    """The vectors of a parsed answer (`parse_embeddings`), in input order, as float32 arrays."""
    return [_vector(e.embedding) for e in sorted(answer.data, key=lambda e: e.index)]

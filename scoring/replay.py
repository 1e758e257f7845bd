"""Seeded sampling, replayed: which token a node's seeded sampler had to emit at each position.

vLLM (v1) samples a seeded request with a private `torch.Generator(seed)`. On CPU (`forward_cpu` in
vllm/v1/sample/ops/topk_topp_sampler.py) each decode step draws one 31-bit step seed from that generator
and takes `fused_gumbel_argmax(logits / T, step_seed)`: Gumbel-max with noise that depends only on
(step seed, token id). So given the reference's logits at every position (one teacher-forced prefill)
and the request's seed, the validator knows the token the claimed model had to emit, exactly: the
check is an argmax, not a likelihood (Token-DiFR's idea; here the noise is replayed, not estimated).

The reference returns only the top-k logprobs (+ the emitted token's) per position. The other tokens
are bounded above by the k-th value, so each position is decided with two rows:

    low  = known values, unknown tokens at -inf     upper = unknown tokens at the k-th value
    argmax(low + g) != emitted          -> "bad": a known token beats the emitted one for certain
    argmax(upper + g) == emitted        -> "ok":  no token, known or not, can beat it
    otherwise                           -> "unsure": an unknown token might have won; not counted

`tol` (in logit/T units) is added to the emitted token's value first: float differences between the
node's decode and the reference's prefill (kernels, dtype, threads, batch shape) may flip a near-tie;
`scoring.verify` passes its margin tolerance / T, and `replay_margins` measures honest margins for
calibration.

Replayable: temperature > 0 with a seed and no top_p/top_k/min_p/penalties/logit bias (those reshape
the distribution from values the top-k does not hold; greedy requests are checked by rank instead).
GPU nodes sample with `exponential_` noise from the generator (`random_sample`); replay for those
needs the same engine build and `VLLM_BATCH_INVARIANT=1` (see README), and is not implemented here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

Step = Literal["ok", "bad", "unsure"]


class NoisyArgmax(Protocol):
    """The node engine's seeded sampler, as far as replay needs it."""

    def __call__(self, rows: np.ndarray, seed: int) -> np.ndarray:
        """rows: [n_steps, vocab] float32 logits (already / T) of steps 0..n-1 of a request seeded with
        `seed`; returns the token each step's sampler picks."""
        ...


# Request fields that change the distribution sampled from in ways replay from top-k values cannot
# rebuild (a request with any of them is checked by the logprob floor instead).
RESHAPING_FIELDS = frozenset(
    {
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "min_tokens",
        "bad_words",
        "allowed_token_ids",
    }
)


def resolve_sampler(name: str) -> NoisyArgmax | None:
    """'vllm-cpu' | 'numpy' | 'none' | 'auto' (vllm-cpu where this vLLM build has the CPU kernel)."""
    if name == "numpy":
        return numpy_gumbel_argmax
    if name == "none":
        return None
    if name == "vllm-cpu":
        return vllm_cpu_argmax
    if name == "auto":
        try:
            return vllm_cpu_argmax if hasattr(_vllm_ops(), "fused_gumbel_argmax") else None
        except Exception:  # noqa: BLE001 - no vLLM (or a GPU build without the kernel): no replay
            return None
    raise ValueError(f"unknown node sampler {name!r}; choose auto, vllm-cpu, numpy or none")


@functools.cache
def _vllm_ops():
    """torch.ops._C with vLLM's kernels, loaded as vLLM loads them: on x86 CPUs the build for this CPU's
    instruction set (`vllm._C` itself is the AVX-512 BF16 build: an illegal instruction on other CPUs)."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return torch.ops._C


def vllm_cpu_argmax(rows: np.ndarray, seed: int) -> np.ndarray:
    """vLLM CPU's seeded sampler (forward_cpu, fp32 Gumbel): one step seed per decode step."""
    import torch

    ops = _vllm_ops()

    gen = torch.Generator().manual_seed(int(seed))
    steps = torch.empty(len(rows), dtype=torch.long)
    for i in range(len(rows)):
        steps[i] = torch.randint(0, 2**31, (1,), generator=gen, dtype=torch.long).item()
    t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return ops.fused_gumbel_argmax(t, steps).numpy()


def numpy_gumbel_argmax(rows: np.ndarray, seed: int, first_step: int = 0) -> np.ndarray:
    """A stand-in seeded sampler (fakes, unit tests): Gumbel noise from a numpy generator per step
    (`first_step`: the step of rows[0], for samplers that draw one step at a time)."""
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        g = np.random.default_rng([int(seed), first_step + i]).gumbel(size=row.shape[0]).astype(np.float32)
        out[i] = int(np.argmax(row + g))
    return out


def replay_steps(
    ref: Sequence[dict[int, float]],
    emitted: Sequence[int],
    temperature: float,
    seed: int,
    vocab_size: int,
    argmax: NoisyArgmax,
    tol: float = 0.0,
) -> list[Step]:
    """Per position: is the emitted token the one the seeded sampler picks under the reference?"""
    if temperature <= 0:
        raise ValueError("replay is for sampled requests (temperature > 0)")
    n = len(emitted)
    if n == 0:
        return []
    low = np.full((n, vocab_size), -np.inf, dtype=np.float32)
    high = np.empty((n, vocab_size), dtype=np.float32)
    for t, (dist, tok) in enumerate(zip(ref, emitted)):
        vals = {k: v for k, v in dist.items() if 0 <= k < vocab_size}
        kth = min(vals.values()) / temperature if vals else 0.0
        high[t].fill(kth)
        for k, v in vals.items():
            low[t, k] = high[t, k] = v / temperature
        if 0 <= tok < vocab_size:
            low[t, tok] += tol
            high[t, tok] += tol
    a_low, a_high = argmax(low, seed), argmax(high, seed)
    out: list[Step] = []
    for t, tok in enumerate(emitted):
        if a_low[t] != tok:
            out.append("bad")
        elif a_high[t] == tok:
            out.append("ok")
        else:
            out.append("unsure")
    return out


MARGIN_GRID = (0.0, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)


def replay_margins(
    ref: Sequence[dict[int, float]],
    emitted: Sequence[int],
    temperature: float,
    seed: int,
    vocab_size: int,
    argmax: NoisyArgmax,
    grid: Sequence[float] = MARGIN_GRID,
) -> list[float]:
    """Replay's analogue of the greedy margin, for calibration: per position, the smallest headroom in
    `grid` (logit units, i.e. before / T) with which the emitted token is no longer ruled out ("bad")
    by the seeded sampler; inf beyond the grid. One replay per grid value."""
    out = [math.inf] * len(emitted)
    for g in sorted(grid):
        steps = replay_steps(ref, emitted, temperature, seed, vocab_size, argmax, g / temperature)
        for t, st in enumerate(steps):
            if st != "bad" and out[t] == math.inf:
                out[t] = g
        if all(m < math.inf for m in out):
            break
    return out

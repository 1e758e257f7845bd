"""One reference engine shared by several validators, batching what they ask at the same time.

On a small machine (the local network's default, `shared_reference_engine: true`) all validators call
ONE vLLM reference engine per model: that saves an engine per validator on a 2-core machine. In
production every validator runs its own engine (`shared_reference_engine: false`): a validator must
trust only its own reference, and a shared engine is a single point of failure and of trust. deploy
runs `ReferenceEngineService` as a Ray actor and hands validators a proxy to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from scoring.reference import VllmReferenceEngine


class ReferenceEngineService:
    """Holds one `VllmReferenceEngine`, shared by the local validators (a Ray actor).

    Calls that arrive while the engine is busy are batched into its next `generate` (one prefill
    step for many teacher-forced completions), so validators do not queue behind each other; the
    engine itself runs in one thread at a time (vllm.LLM is not thread-safe)."""

    def __init__(
        self, model_source: str | None, engine_kwargs: Mapping[str, Any] | None = None, engine: Any = None
    ) -> None:
        if engine is None:  # `engine`: any object with prompt_logprobs_many (unit tests pass a fake)
            engine = VllmReferenceEngine(model_source, **dict(engine_kwargs or {}))
        self.engine = engine
        self._queue: list[tuple[list, int, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.calls = self.batches = 0
        self.isolated = 0  # batches that failed and were re-run caller by caller

    async def prompt_logprobs_many(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], top_k: int
    ) -> list[list[dict[int, float]]]:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((list(pairs), top_k, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            top_k = max(
                k for _, k, _ in batch
            )  # a larger top-k only adds entries; each pair's own token is kept
            flat = [p for pairs, _, _ in batch for p in pairs]
            try:
                out = await asyncio.to_thread(self.engine.prompt_logprobs_many, flat, top_k)
            except Exception:  # noqa: BLE001 - one bad item must not fail its batch-mates
                self.isolated += 1
                for pairs, _, fut in batch:  # each caller alone: an error reaches only its sender
                    await self._run_alone(pairs, top_k, fut)
                continue
            self.calls += len(batch)
            self.batches += 1
            i = 0
            for pairs, _, fut in batch:
                if not fut.done():
                    fut.set_result(out[i : i + len(pairs)])
                i += len(pairs)

    async def _run_alone(self, pairs: list, top_k: int, fut: asyncio.Future) -> None:
        if fut.done():
            return
        try:
            fut.set_result(await asyncio.to_thread(self.engine.prompt_logprobs_many, pairs, top_k))
        except Exception as exc:  # noqa: BLE001 - handed to that caller alone
            fut.set_exception(exc)

    async def stats(self) -> dict[str, int]:
        return {"calls": self.calls, "batches": self.batches, "isolated": self.isolated}

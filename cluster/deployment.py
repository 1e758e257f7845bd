"""Build one node's Ray Serve application on ray.serve.llm (no engine wrapper of our own).

Placement: every node's placement-group bundle asks for a sliver of the custom resource
`accel_<type>`, so Ray only schedules the replica (and its vLLM engine) on a Ray node that
advertises that accelerator. `LLMConfig.accelerator_type` would do the same on GPU clusters,
but ray.serve.llm refuses it for CPU-only bundles, and the custom resource works everywhere.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncGenerator

from pydantic import BaseModel, ConfigDict, Field

from cluster.records import NodeSpec

# A replica takes this much of its accelerator resource; small so several replicas of several
# nodes can share one advertised accelerator (Ray rounds resource amounts to 1e-4).
ACCEL_SHARE = 0.01


class EngineDefaults(BaseModel):
    """Engine settings applied to every node unless its NodeSpec.engine_kwargs overrides them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    use_gpu: bool = Field(default=False, description="Ask Ray for a GPU per replica (GPU clusters).")
    cpus_per_replica: float = Field(default=1.0, gt=0, description="Logical CPUs one replica reserves.")
    max_model_len: int = Field(default=1024, ge=64, description="Context window the engine allocates for.")
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Serve's cap of concurrent requests per replica (queues beyond)."
    )
    stream_batching_interval_ms: float = Field(
        default=0.0,
        ge=0,
        description="ray.serve.llm batches stream chunks every N ms (stock default 50), which delays the "
        "first token by up to N ms. 0 (ours) never waits: the first chunk goes out at once, and chunks "
        "that arrive while the previous message is in flight travel together (see NodeServer).",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine arguments shared by all nodes (e.g. dtype)."
    )


_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def coalesce_ready(stream: AsyncGenerator[Any, None]) -> AsyncGenerator[list[Any], None]:
    """Yield lists of chunks without ever waiting for more: each list holds the chunk that just
    arrived plus any that queued up while the previous list was being sent downstream.

    Why: a fixed batching interval adds its length to time-to-first-token, while sending every
    token as its own message costs one Serve streaming hop per token. Coalescing only what is
    already waiting gives the first token at once and fewer messages exactly when the consumer
    is the bottleneck.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
        except Exception as exc:  # handed to the consumer, raised there in order
            queue.put_nowait(_Failed(exc))
        finally:
            queue.put_nowait(_END)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            batch: list[Any] = []
            item = await queue.get()
            while True:
                if item is _END or isinstance(item, _Failed):
                    if batch:
                        yield batch
                    if isinstance(item, _Failed):
                        raise item.exc
                    return
                batch.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            yield batch
    finally:
        task.cancel()


def _node_server_cls():
    """ray.serve.llm's LLMServer with the coalescing stream above (everything else is stock)."""
    from ray.serve.llm import LLMServer

    class NodeServer(LLMServer):
        def _batch_output_stream(self, generator):
            if self._get_batch_interval_ms():
                return super()._batch_output_stream(generator)
            return coalesce_ready(generator)

    return NodeServer


def deployment_name(spec: NodeSpec) -> str:
    """Serve application and deployment name of a node (one application per node)."""
    return deployment_name_for_id(spec.node_id)


def deployment_name_for_id(node_id: str) -> str:
    return f"node-{node_id}"


def llm_config_for(spec: NodeSpec, defaults: EngineDefaults | None = None):
    """The ray.serve.llm LLMConfig that runs `spec` on its accelerator."""
    from ray.serve.llm import LLMConfig

    defaults = defaults or EngineDefaults()
    bundle: dict[str, float] = {"CPU": defaults.cpus_per_replica, spec.accelerator_resource: ACCEL_SHARE}
    if defaults.use_gpu:
        bundle["GPU"] = 1.0
    engine_kwargs = {
        "max_model_len": defaults.max_model_len,
        "max_num_seqs": spec.capacity,
        **defaults.engine_kwargs,
        **spec.engine_kwargs,
    }
    return LLMConfig(
        model_loading_config={"model_id": spec.model_id, "model_source": spec.model_source},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": [bundle], "strategy": "STRICT_PACK"},
        deployment_config={
            "num_replicas": spec.replicas,
            "max_ongoing_requests": defaults.max_ongoing_requests,
        },
        experimental_configs={"stream_batching_interval_ms": defaults.stream_batching_interval_ms},
        log_engine_metrics=False,
    )


def build_node_app(spec: NodeSpec, defaults: EngineDefaults | None = None):
    """A Serve Application running `spec` as an LLMServer deployment named `deployment_name(spec)`."""
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(
        llm_config_for(spec, defaults),
        name_prefix="",
        override_serve_options={"name": deployment_name(spec)},
        deployment_cls=_node_server_cls(),
    )

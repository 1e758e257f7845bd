"""Build one node's Ray Serve application on ray.serve.llm (no engine wrapper of our own).

Placement: every node's placement-group bundle asks for a sliver of the custom resource
`accel_<type>`, so Ray only schedules the replica (and its vLLM engine) on a Ray node that
advertises that accelerator. `LLMConfig.accelerator_type` would do the same on GPU clusters,
but ray.serve.llm refuses it for CPU-only bundles, and the custom resource works everywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.records import NodeSpec, deployment_name

# A replica takes this much of its accelerator resource; small so several replicas of several
# nodes can share one advertised accelerator (Ray rounds resource amounts to 1e-4).
ACCEL_SHARE = 0.01
# An embedding node (NodeSpec.task "embed"): vLLM runs the model as a pooling model whose vectors are its
# last token's hidden state, normalised (any decoder model converts; a real embedding model keeps its own
# pooler). The serving kwargs (tool parsers) are a generation server's and are left out.
EMBED_ENGINE_KWARGS = {"runner": "pooling", "convert": "embed"}


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
    stream_linger_ms: float = Field(
        default=40.0,
        ge=0,
        le=1000,
        description="After the first two messages (never delayed: for chat the role header and the first "
        "token), a message waits up to this long for more chunks: fewer messages per token. 0 sends each "
        "chunk as soon as the previous one left. Only while the replica is busy (stream_linger_from_streams)"
        ", where it buys throughput: over direct HTTP, c32 tokens/s 0.76x -> 0.87x bare vLLM "
        "(benchmarks/RESULTS.md, gateway).",
    )
    stream_linger_from_streams: int = Field(
        default=16,
        ge=0,
        description="Linger only while the replica sends at least this many streams: up to that every token "
        "goes out as it comes (no clumps: over direct HTTP, lingering from 4 streams made the c8 "
        "inter-token gap p90 47 ms against bare vLLM's 17.5, and c8 TTFT 1.85x bare instead of 1.60x); a "
        "busier replica saves messages (0: always linger).",
    )
    single_process_engine: bool = Field(
        default=True,
        description="Run a one-device engine's model inside vLLM's engine process (vLLM's own default for "
        "one device, the 'uni' executor), not in a separate worker process as ray.serve.llm forces on CPU "
        "('mp'): that worker and the engine busy-wait on each other through shared memory, which on a "
        "small CPU machine takes cores from the model (benchmarks/RESULTS.md, gateway vs bare vLLM).",
    )
    health_check_period_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often Serve asks a replica whether its engine is alive (ray.serve.llm's default is "
        "10 s). Serve replaces a replica after 3 failed checks in a row, and the registry takes a node out of "
        "rotation as soon as its replica is not RUNNING: a dead engine (SIGKILLed engine core) was off the "
        "network about 30 s after its death at 10 s, and is in about 6-10 s at 2 s. The check reads a flag.",
    )
    direct_http: bool = Field(
        default=True,
        description="The gateway streams a one-replica managed node's text over HTTP straight from the "
        "node's replica (cluster/node_http.py DirectServer): no Ray object and no Serve bookkeeping per "
        "message (benchmarks/RESULTS.md, gateway). Serve's max_ongoing_requests does not count these calls: "
        "vLLM's own scheduler queues them (max_num_seqs). Off, or with several replicas: the Serve handle.",
    )
    direct_http_host: str | None = Field(
        default=None,
        description="The address that HTTP server binds: None for the Ray node's IP, which a gateway on "
        "another machine reaches; the local network uses its own host (127.0.0.1).",
    )
    engine_metrics: bool = Field(
        default=True,
        description="Export vLLM's engine metrics (queue, KV cache use, token counts, its own latency "
        "histograms) through Ray's metrics agent as ray_vllm_*: Prometheus scrapes them with Ray's "
        "service discovery (deploy/prometheus/prometheus.yml).",
    )
    engine_kwargs: dict[str, Any] = Field(
        # bf16 halves memory traffic on CPU; eager mode skips torch.compile, which takes minutes on
        # 2 cores. No chunked prefill: vLLM 0.32's CPU sampler crashes the engine ("CPU Generator does
        # not use offset") when a seeded sampled request's prompt is split across steps, and the gateway
        # seeds every request; a whole prompt per step needs max_num_batched_tokens >= max_model_len
        # (llm_config_for sets it). Structured output (response_format json_schema / json_object, named
        # and required tool calls) without free whitespace: a model may otherwise fill max_tokens with
        # blanks between JSON tokens and answer JSON that does not parse (measured on the default model:
        # 0 of 8 sampled json_schema answers parsed, 8 of 8 without it). On GPUs set this to your own.
        default_factory=lambda: {
            "dtype": "bfloat16",
            "enforce_eager": True,
            "enable_chunked_prefill": False,
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        },
        description="vLLM engine arguments shared by all nodes (NodeSpec.engine_kwargs override them); "
        "validators' reference engines take them too.",
    )
    serving_kwargs: dict[str, Any] = Field(
        # Tool calls: vLLM constrains named and required tool calls to the tools' JSON schemas itself but
        # refuses them without a parser; `pythonic` needs no special tokens, so it loads with any
        # tokenizer. Set the parser your model was trained for (hermes, llama3_json, ...).
        default_factory=lambda: {"enable_auto_tool_choice": True, "tool_call_parser": "pythonic"},
        description="vLLM's OpenAI-server arguments for every node (not engine arguments: reference engines "
        "never see them); NodeSpec.engine_kwargs override them.",
    )


_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class StreamCount:
    """Streams a replica is sending right now; lingering only pays when there are many."""

    __slots__ = ("active", "linger_from")

    def __init__(self, linger_from: int = 0) -> None:
        self.active = 0
        self.linger_from = linger_from

    def busy(self) -> bool:
        return self.active >= self.linger_from


async def coalesce_ready(
    stream: AsyncGenerator[Any, None],
    linger_s: float = 0.0,
    immediate: int = 2,
    streams: StreamCount | None = None,
) -> AsyncGenerator[list[Any], None]:
    """Yield lists of chunks. The first `immediate` lists go out as soon as a chunk is there (with
    whatever else is already queued). Later lists hold whatever queued up while the previous list
    was being sent, and, with `linger_s` > 0, whatever arrives within `linger_s` of the list's first
    chunk.

    Why: a fixed batching interval from the start (stock ray.serve.llm: 50 ms) adds its length to
    time-to-first-token, while sending every token as its own message costs one Serve streaming hop
    per token, which on a busy CPU is more than the decode step itself. So: never delay the first
    token (a chat stream's first chunk is only the role header, hence two immediate messages), and
    after it trade a few milliseconds of smoothness for far fewer messages. With `streams`, that trade
    is made only while at least `streams.linger_from` streams are being sent: a lone stream's hops are
    cheap, and lingering would only make its tokens arrive in clumps.
    """
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def pump() -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there in order
            queue.put_nowait(_Failed(exc))
        finally:
            queue.put_nowait(_END)

    task = loop.create_task(pump())
    sent = 0
    if streams is not None:
        streams.active += 1
    try:
        while True:
            batch: list[Any] = []
            item = await queue.get()
            lingers = sent >= immediate and (streams is None or streams.busy())
            deadline = loop.time() + (linger_s if lingers else 0.0)
            sent += 1
            while True:
                if item is _END or isinstance(item, _Failed):
                    if batch:
                        yield batch
                    if isinstance(item, _Failed):
                        raise item.exc
                    return
                batch.append(item)
                if not queue.empty():
                    item = queue.get_nowait()
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            yield batch
    finally:
        task.cancel()
        if streams is not None:
            streams.active -= 1


async def _texts(stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    from cluster.completions import as_text

    async for item in stream:
        yield [as_text(x) for x in item] if isinstance(item, list) else as_text(item)


def _single_process_engine_cls():
    """ray.serve.llm's vLLM engine, with a one-device model run in vLLM's engine process ('uni')."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine  # pinned Ray: see pyproject

    class SingleProcessEngine(VLLMEngine):
        def _start_async_llm_engine(self, engine_args, engine_config, placement_group):
            if engine_config.parallel_config.world_size == 1:
                engine_config.parallel_config.distributed_executor_backend = "uni"
            return super()._start_async_llm_engine(engine_args, engine_config, placement_group)

    return SingleProcessEngine


def _node_server_cls():
    """ray.serve.llm's LLMServer with the coalescing stream above and, optionally, the single-process
    engine (everything else is stock)."""
    from ray.serve.llm import LLMServer

    class NodeServer(LLMServer):
        def _get_default_engine_class(self):
            if self._llm_config.experimental_configs.get("single_process_engine"):
                return _single_process_engine_cls()
            return super()._get_default_engine_class()

        async def check_health(self):
            """Serve's health check: vLLM's own, and first whether the engine's processes still run
            (cluster/engine_watch.py: vLLM noticed a SIGKILLed engine core only ~30 s later)."""
            from cluster.engine_watch import EngineWatch

            if getattr(self, "_watch", None) is None:
                self._watch = EngineWatch()
            lost = self._watch.lost()
            if lost is not None:
                raise RuntimeError(f"the node's vLLM engine died: {lost}; Serve replaces this replica")
            return await super().check_health()

        async def _run_request(self, request, **kwargs):
            # Text only leaves a node: the gateway parses it (cluster/completions.py) and never uses a
            # node's objects (an object's methods would be the node's code running in the gateway).
            return _texts(await super()._run_request(request, **kwargs))

        async def http_link(self):
            """Where the gateway reaches this replica over HTTP (cluster/node_http.py DirectServer),
            started on the first call; None when direct HTTP is off or the node has several replicas
            (then its Serve handle balances them)."""
            cfg = self._llm_config.experimental_configs
            if not cfg.get("direct_http") or self._llm_config.deployment_config.get("num_replicas") != 1:
                return None
            if getattr(self, "_direct", None) is None:
                self._direct = asyncio.ensure_future(self._start_direct(cfg.get("direct_http_host")))
            return (await asyncio.shield(self._direct)).link

        async def _start_direct(self, host: str | None):
            import ray

            from cluster.node_http import DirectServer

            async def start(method: str, body):
                return await getattr(self, method)(body, None)

            host = host or ray.util.get_node_ip_address()
            return await DirectServer.start(host, self._llm_config.model_id, start)

        def _batch_output_stream(self, generator):
            if self._get_batch_interval_ms():
                return super()._batch_output_stream(generator)
            cfg = self._llm_config.experimental_configs
            if not hasattr(self, "_streams"):
                self._streams = StreamCount(cfg.get("stream_linger_from_streams", 0))
            return coalesce_ready(
                generator, linger_s=cfg.get("stream_linger_ms", 0.0) / 1000.0, streams=self._streams
            )

    return NodeServer


def bundles_for(spec: NodeSpec, defaults: EngineDefaults, engine_kwargs: dict) -> list[dict[str, float]]:
    """One replica's placement-group bundles: on CPU one bundle; on GPUs one bundle per device the
    engine shards over (tensor x pipeline parallel), the first also holding the replica's CPUs. Every
    bundle carries the accelerator marker and STRICT_PACK keeps them on one Ray node, so a multi-GPU
    engine gets GPUs of the node's type on one machine."""
    marker = {spec.accelerator_resource: ACCEL_SHARE}
    if not defaults.use_gpu:
        return [{"CPU": defaults.cpus_per_replica, **marker}]
    devices = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(
        engine_kwargs.get("pipeline_parallel_size", 1)
    )
    first = {"CPU": defaults.cpus_per_replica, "GPU": 1.0, **marker}
    return [first] + [{"GPU": 1.0, **marker} for _ in range(devices - 1)]


def llm_config_for(spec: NodeSpec, defaults: EngineDefaults | None = None):
    """The ray.serve.llm LLMConfig that runs `spec` on its accelerator."""
    from ray.serve.llm import LLMConfig

    defaults = defaults or EngineDefaults()
    engine_kwargs = {
        "max_model_len": defaults.max_model_len,
        "max_num_seqs": spec.capacity,
        **defaults.engine_kwargs,
        **(defaults.serving_kwargs if spec.task == "generate" else EMBED_ENGINE_KWARGS),
        **spec.engine_kwargs,
    }
    if engine_kwargs.get("enable_chunked_prefill") is False:  # every prompt must fit one step
        engine_kwargs["max_num_batched_tokens"] = max(
            int(engine_kwargs.get("max_num_batched_tokens") or 0), int(engine_kwargs["max_model_len"])
        )
    return LLMConfig(
        model_loading_config={"model_id": spec.model_id, "model_source": spec.model_source},
        engine_kwargs=engine_kwargs,
        placement_group_config={
            "bundles": bundles_for(spec, defaults, engine_kwargs),
            "strategy": "STRICT_PACK",
        },
        deployment_config={
            "num_replicas": spec.replicas,
            "max_ongoing_requests": defaults.max_ongoing_requests,
            "health_check_period_s": defaults.health_check_period_s,
        },
        experimental_configs={
            "stream_batching_interval_ms": defaults.stream_batching_interval_ms,
            "stream_linger_ms": defaults.stream_linger_ms,
            "single_process_engine": defaults.single_process_engine,
            "stream_linger_from_streams": defaults.stream_linger_from_streams,
            "direct_http": defaults.direct_http,
            "direct_http_host": defaults.direct_http_host,
        },
        log_engine_metrics=defaults.engine_metrics,
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

"""What `meritnet node serve` runs: a node YAML (ray.serve.llm's own LLMConfig, the part an operator
decides) and the flags, checked and merged into one NodeSettings, and the URL the node advertises.
Every refusal is a NodeConfigError whose message says what to change (deploy/node_cli.py prints it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What an LLMConfig may say here, and what meritnet derives itself. placement_group_config is built from
# the accelerator and tensor x pipeline parallel (cluster/deployment.py bundles_for); the rest of
# LLMConfig (server_cls, lora_config, ...) is the network's side of the node and not the operator's.
NODE_CONFIG_KEYS = (
    "model_loading_config",
    "accelerator_type",
    "engine_kwargs",
    "deployment_config",
    "runtime_env",
)
_DEPLOYMENT_KEYS = {"num_replicas", "max_ongoing_requests", "health_check_period_s"}
_LOADING_KEYS = {"model_id", "model_source"}
NODE_YAML_EXAMPLE = """\
model_loading_config:
  model_id: llama-3.1-8b
  model_source: meta-llama/Llama-3.1-8B-Instruct
accelerator_type: H100
engine_kwargs:
  max_model_len: 8192
  tensor_parallel_size: 2
  dtype: bfloat16
deployment_config:
  max_ongoing_requests: 128"""


class NodeConfigError(ValueError):
    """A node config that cannot run; the message says what to change."""


@dataclass(frozen=True)
class NodeSettings:
    """Everything `node serve` hands to OpenNode, from a node YAML and/or the flags."""

    model: str
    source: str | None
    accelerator: str
    capacity: int
    engine: Any  # cluster.deployment.EngineDefaults
    task: str  # 'generate' or 'embed' (cluster.records.NodeTask)
    env_vars: dict[str, str]

    @property
    def uses_gpu(self) -> bool:
        return bool(self.engine.use_gpu)


def _problems(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in errors())


def read_node_yaml(path: Path) -> dict[str, Any]:
    """The YAML file as a mapping (a clear error for a missing file, bad YAML or a non-mapping)."""
    import yaml

    try:
        with path.open() as f:  # a stream, so YAML's messages name the file and line
            data = yaml.safe_load(f)
    except OSError as exc:
        raise NodeConfigError(f"cannot read the node config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise NodeConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise NodeConfigError(
            f"{path} must be a mapping of LLMConfig fields ({', '.join(NODE_CONFIG_KEYS)}), e.g.:\n"
            + NODE_YAML_EXAMPLE
        )
    return data


def node_settings(
    config: dict[str, Any] | None = None,
    *,
    model: str | None = None,
    source: str | None = None,
    accelerator: str | None = None,
    capacity: int | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    where: str = "the node config",
    task: str = "generate",
) -> NodeSettings:
    """A node from an LLMConfig mapping (validated by ray.serve.llm's LLMConfig first, so its own
    messages name typos) and the flags. A config with `accelerator_type` (a GPU type Ray knows: H100,
    L4, A10G, ...) asks Ray for one GPU per tensor x pipeline parallel rank and keeps vLLM's own engine
    defaults; without it the node runs on CPU with meritnet's CPU defaults (bfloat16, eager, no chunked
    prefill, OMP_NUM_THREADS=1) under whatever the config sets. Flags may not contradict the config.
    `task` 'embed' serves /v1/embeddings (vLLM's pooling runner) instead of chat and completions."""
    from cluster.deployment import EngineDefaults
    from deploy.config import CPU_ENGINE_ENV

    config = dict(config or {})
    if config:
        from pydantic import ValidationError
        from ray.serve.llm import LLMConfig

        try:
            LLMConfig(**config)
        except (ValidationError, ValueError, TypeError) as exc:
            raise NodeConfigError(
                f"{where} is not a valid ray.serve.llm LLMConfig: {_problems(exc)}"
            ) from None
    extra = sorted(set(config) - set(NODE_CONFIG_KEYS))
    if "placement_group_config" in extra:
        raise NodeConfigError(
            f"{where}: remove placement_group_config; meritnet places the replica itself (one GPU bundle "
            "per tensor_parallel_size x pipeline_parallel_size, all on the Ray node with accel_<type>)"
        )
    if extra:
        raise NodeConfigError(
            f"{where}: {', '.join(extra)} not supported by `node serve`; it reads {', '.join(NODE_CONFIG_KEYS)}"
        )
    loading = dict(config.get("model_loading_config") or {})
    if set(loading) - _LOADING_KEYS:
        raise NodeConfigError(
            f"{where}: model_loading_config takes model_id and model_source only (not {', '.join(sorted(set(loading) - _LOADING_KEYS))})"
        )
    for flag, key, value in (("--model", "model_id", model), ("--source", "model_source", source)):
        if value is not None and loading.get(key) not in (None, value):
            raise NodeConfigError(
                f"{flag} {value} contradicts model_loading_config.{key}: {loading[key]} in {where}; drop one"
            )
    gpu_type = config.get("accelerator_type")
    if accelerator and gpu_type and accelerator != gpu_type:
        raise NodeConfigError(
            f"--accelerator {accelerator} contradicts accelerator_type: {gpu_type} in {where}; drop one"
        )
    accelerator = gpu_type or accelerator
    if not accelerator:
        raise NodeConfigError(
            "no accelerator: set accelerator_type (a GPU type Ray knows, e.g. H100, L4, A10G) in the node "
            "config for a GPU node, or pass --accelerator NAME for a CPU node (any name, e.g. CPU-AVX512)"
        )
    deployment = dict(config.get("deployment_config") or {})
    if set(deployment) - _DEPLOYMENT_KEYS:
        raise NodeConfigError(
            f"{where}: deployment_config takes {', '.join(sorted(_DEPLOYMENT_KEYS))} only (not "
            f"{', '.join(sorted(set(deployment) - _DEPLOYMENT_KEYS))}): an open node is one replica behind its ingress"
        )
    if deployment.get("num_replicas", 1) != 1:
        raise NodeConfigError(
            f"{where}: deployment_config.num_replicas must be 1 (an open node is one replica; run another node for more)"
        )
    runtime_env = dict(config.get("runtime_env") or {})
    if set(runtime_env) - {"env_vars"}:
        raise NodeConfigError(
            f"{where}: runtime_env takes env_vars only (not {', '.join(sorted(set(runtime_env) - {'env_vars'}))}): "
            "install packages in the node's own environment"
        )
    kwargs = {**(config.get("engine_kwargs") or {}), **(engine_kwargs or {})}
    use_gpu = gpu_type is not None
    if use_gpu and "max_model_len" not in kwargs:
        raise NodeConfigError(
            f"{where}: a GPU node sets engine_kwargs.max_model_len (e.g. 8192; or --max-model-len): "
            "the context the engine allocates for, which the network's default (1024) would cut short"
        )
    base = EngineDefaults()
    max_model_len = int(kwargs.pop("max_model_len", base.max_model_len))
    capacity = int(kwargs.pop("max_num_seqs", capacity or 8))  # the node's capacity is vLLM's max_num_seqs
    try:
        engine = EngineDefaults(
            use_gpu=use_gpu,
            max_model_len=max_model_len,
            engine_kwargs=kwargs if use_gpu else {**base.engine_kwargs, **kwargs},
            **{k: v for k, v in deployment.items() if k != "num_replicas"},
        )
    except ValueError as exc:
        raise NodeConfigError(f"{where}: {_problems(exc)}") from None
    env_vars = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    return NodeSettings(
        model=loading.get("model_id") or model or "default",
        source=loading.get("model_source") or source,
        accelerator=accelerator,
        capacity=capacity,
        engine=engine,
        env_vars=env_vars if use_gpu else {**CPU_ENGINE_ENV, **env_vars},
        task=task,
    )


def advertised_endpoint(host: str, port: int, advertise: str | None) -> str:
    """The URL `node join` registers: --advertise, else the loopback bind itself. A non-loopback bind
    needs --advertise: this machine cannot know the address a network reaches it at (its own name
    resolves to 127.0.1.1 on stock Debian/Ubuntu, and NAT or a TLS proxy may sit in front)."""
    import ipaddress

    from pydantic import TypeAdapter, ValidationError

    from cluster.registration import Endpoint

    if advertise is not None:
        try:
            return TypeAdapter(Endpoint).validate_python(advertise.rstrip("/"))
        except ValidationError as exc:
            raise NodeConfigError(
                f"--advertise {advertise}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}"
            ) from None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise NodeConfigError(
            f"--host {host} is reachable from other machines, but the node cannot tell at which address: "
            f"pass --advertise with the URL the network calls, e.g. --advertise http://203.0.113.7:{port} "
            "(or https://node.example.com behind your TLS proxy)"
        )
    host = "127.0.0.1" if host == "localhost" else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"

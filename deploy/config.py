"""The network's configuration: embedded defaults, overridable from YAML or MERITNET_* env vars.

`make demo` uses the defaults: two nodes of the locally built default model, on two different
simulated accelerator types, and one node serving it as an embeddings model, behind a gateway on
127.0.0.1:8000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.deployment import EngineDefaults
from cluster.local import LocalClusterConfig
from cluster.records import NodeSpec, NodeTask
from deploy.scoring import ValidatorSpec
from routing.config import ModelPrice
from routing.timeouts import Timeouts

# A well-known test address (anvil's first account); replace with your own in a real network.
DEMO_OPERATOR_A = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
DEMO_OPERATOR_B = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
BUILTIN_MODEL = "builtin:default"
DEMO_EMBEDDING_MODEL = "default-embed"  # the built model run as a pooling model (NodeSpec.task "embed")
# vLLM on CPU: 1 GiB KV cache per engine is plenty for the small default model. vLLM pins each CPU
# engine to a core by default, and every engine on one machine would pick the same core.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}  # model_source placeholder: the locally built default model


def resolve_model_source(source: str) -> str:
    """`builtin:default[@seed]` -> the locally built model's directory (built once, cached)."""
    if not source.startswith(BUILTIN_MODEL):
        return source
    from cluster.model import build_default_model

    _, _, seed = source.partition("@")
    return str(build_default_model(seed=int(seed or 0)))


class NodeConfig(BaseModel):
    """A node as written in config; `model_source: builtin:default[@seed]` means the built model."""

    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(description="Unique node id.")
    operator: str = Field(description="EIP-55 address paid for this node.")
    model_id: str = Field(default="default", description="Model name clients ask for.")
    model_source: str = Field(
        default=BUILTIN_MODEL, description="HF id, local path, or builtin:default[@seed]."
    )
    accelerator_type: str = Field(description="Accelerator type the node must be placed on.")
    replicas: int = Field(default=1, description="Serve replicas.")
    capacity: int = Field(default=8, description="Concurrent sequences per replica.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine args.")
    task: NodeTask = Field(
        default="generate", description="'generate' (chat, completions) or 'embed' (/v1/embeddings)."
    )

    def to_spec(self, resolve_source) -> NodeSpec:
        data = self.model_dump()
        data["model_source"] = resolve_source(self.model_source)
        return NodeSpec.model_validate(data)


def _default_nodes() -> list[NodeConfig]:
    return [
        NodeConfig(node_id="h100-a", operator=DEMO_OPERATOR_A, accelerator_type="H100"),
        NodeConfig(node_id="l4-b", operator=DEMO_OPERATOR_B, accelerator_type="L4"),
        NodeConfig(
            node_id="l4-embed",
            operator=DEMO_OPERATOR_B,
            accelerator_type="L4",
            model_id=DEMO_EMBEDDING_MODEL,
            task="embed",
        ),
    ]


class NetworkConfig(BaseSettings):
    """Everything `meritnet up` starts. Env: MERITNET_<FIELD> (nested with __)."""

    model_config = SettingsConfigDict(env_prefix="MERITNET_", env_nested_delimiter="__", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the OpenAI endpoint binds to.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the endpoint (CORS); none by default.",
    )
    open_endpoint: bool = Field(
        default=False,
        description="Allow a non-loopback `host` without `api_keys` (anyone who can reach it may use it).",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI endpoint.")
    state_dir: Path = Field(default=Path(".meritnet"), description="Ledger and chain state live here.")
    nodes: list[NodeConfig] = Field(default_factory=_default_nodes, description="Inference nodes to start.")
    engine: EngineDefaults = Field(
        default_factory=EngineDefaults, description="Engine settings shared by all nodes."
    )
    ray_address: str | None = Field(
        default=None,
        description="Deploy onto this running Ray cluster ('auto', 'HOST:6379'); run `meritnet up` on its "
        "head node. None starts a local test cluster on this machine.",
    )
    cluster: LocalClusterConfig = Field(
        default_factory=lambda: LocalClusterConfig(env_vars=CPU_ENGINE_ENV),
        description="Shape of the local Ray cluster.",
    )
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys; empty = open endpoint.")
    admit_open_nodes: bool = Field(
        default=True,
        description="Operators may bring nodes of their own (`meritnet node join`, signed registration).",
    )
    open_node_networks: list[str] | None = Field(
        default=None,
        description="CIDRs of non-public addresses (private, loopback, link-local...) open nodes may be at, "
        "e.g. ['10.0.0.0/8']; public addresses always may. None: 127.0.0.0/8 when `host` is loopback (the "
        "local demo), else none. The gateway's and control plane's own ports are refused regardless.",
    )
    open_nodes_per_operator: int = Field(default=8, ge=1, description="Open nodes one operator may hold.")
    open_node_max_capacity: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Largest capacity an open node may sign (load is normalised by it).",
    )
    open_nodes_without_validators: bool | None = Field(
        default=None,
        description="Admit open nodes although `validators` is empty: nothing then checks their outputs and "
        "settlement pays them at quality 1.0. None: only on a network whose `host` is loopback (the local "
        "demo: only this machine can join it). For test networks only.",
    )
    timeouts: Timeouts = Field(
        default_factory=lambda: Timeouts(),
        description="How long a node may take per request: first_byte_s, stream_idle_s, total_base_s, "
        "total_per_token_s, total_max_s (routing/gateway.py).",
    )
    router_config: str | None = Field(
        default=None, description="Routing profile YAML (default profile if unset)."
    )
    start_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="How long `meritnet up` waits for every node's engine to be running (models download "
        "and load; large models on a cold cluster need more) before it stops with the nodes' states.",
    )
    epoch_length_s: float = Field(default=60.0, gt=0, description="Settlement epoch length in seconds.")
    chain_url: str = Field(
        default="embedded",
        description="'embedded' (in-process py-evm; state lives as long as `meritnet up`), 'anvil' (a local "
        "anvil node `meritnet up` starts, state in state_dir/anvil/; deploy/localchain.py) or a JSON-RPC URL.",
    )
    settlement: bool = Field(default=True, description="Run the settlement actor (epochs -> chain).")
    signer_socket: Path | None = Field(
        default=None,
        description="The Unix socket of a signer the runner runs (`python -m deploy.signer`), which holds "
        "the settler's and validators' keys outside the Ray cluster. None: `meritnet up` starts its own "
        "(state_dir/signer/); under `serve deploy` the settlement actor then loads the key itself.",
    )
    validator_share_bps: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="Validators' part of each epoch's emission in basis points, split by their Yuma "
        "dividends; the rest goes to operators by usage x quality. None: the settler's default "
        "(settlement/config.py SettlementConfig: 2,000 = 20%, or $MERITNET_SETTLEMENT_VALIDATOR_SHARE_BPS).",
    )
    validators: list[ValidatorSpec] = Field(
        default_factory=list,
        description="Validators to run, e.g. [{validator_id: v1, stake: 2.0}] (deploy/scoring.py). None by "
        "default: a reference engine is one more vLLM engine on a 2-core machine. Without validators "
        "every node stays unscored (router: 'unscored' score) and settlement pays it at quality 1.0; with "
        "validators an unscored node is on probation (quality 0) until its first consensus score.",
    )
    pricing: dict[str, ModelPrice] = Field(
        default_factory=lambda: {"default": ModelPrice(input_per_million=0, output_per_million=0)},
        description="model id -> price per million prompt and completion tokens, as /v1/models states it "
        "(the demo's model is free).",
    )
    trusted_models: dict[str, str] = Field(
        default_factory=lambda: {"default": BUILTIN_MODEL},
        description="model id -> the weights validators trust as that model (HF id, path or builtin).",
    )
    embedding_models: dict[str, str] = Field(
        default_factory=lambda: {DEMO_EMBEDDING_MODEL: BUILTIN_MODEL},
        description="model id -> the trusted weights of an embeddings model (nodes with task 'embed'): the "
        "gateway counts their inputs' tokens with its tokenizer, validators recompute their vectors with it.",
    )
    shared_reference_engine: bool = Field(
        default=True,
        description="All local validators share one reference engine per model (saves engines on small "
        "machines). Set false in production: each validator then loads and trusts its own.",
    )
    consensus_period_s: float = Field(default=5.0, gt=0, description="Seconds between consensus rounds.")
    consensus_activity_cutoff_s: float = Field(
        default=900.0,
        gt=0,
        description="Consensus ignores a validator's score of a node older than this (the validator stopped "
        "observing it). Keep it well above the mean time between challenges (60 / challenges_per_node_per_min).",
    )
    shadow_rate: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="With validators: share of verifiable organic requests the gateway hands to validators "
        "for shadow verification (0 turns it off). Their prompts and outputs stay in memory, never on disk.",
    )
    public_rpc_url: str | None = Field(
        default=None,
        description="A public JSON-RPC URL of the settlement chain, named beside reward proofs so operators "
        "and validators claim with `meritnet settlement claim --network URL` alone (with --chain anvil: "
        "that anvil's URL unless set). Never a URL that holds a provider's API key.",
    )
    allow_remote_model_code: bool = Field(
        default=False,
        description="Let managed nodes set trust_remote_code (a model repository's Python runs in the "
        "network's Ray cluster, beside the settler and validators' keys). Off: such a model is refused.",
    )
    scoring_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Serve the scoring gauges at http://127.0.0.1:<port>/metrics (None: only via the "
        "consensus actor's metrics_text()).",
    )

    @model_validator(mode="after")
    def _no_open_endpoint_by_accident(self) -> NetworkConfig:
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        if not loopback and not self.api_keys and not self.open_endpoint:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines and no api_keys are set: set api_keys, "
                "or pass --open (open_endpoint: true) to serve anyone who can reach it"
            )
        return self

    @model_validator(mode="after")
    def _whole_second_epochs(self) -> NetworkConfig:
        if self.settlement and (self.epoch_length_s < 1 or not float(self.epoch_length_s).is_integer()):
            raise ValueError(
                f"epoch_length_s is {self.epoch_length_s}: the contract times epochs in whole seconds; "
                "use a whole number of seconds, at least 1"
            )
        return self

    @model_validator(mode="after")
    def _no_model_code_in_the_cluster(self) -> NetworkConfig:
        """Managed nodes' engines run in the network's Ray cluster, where any code can call the
        control-plane actors (issue 28; the keys themselves are held outside it, deploy/signer.py). vLLM runs only its own and torch's code
        unless trust_remote_code lets a model repository's Python in: refused unless the runner says
        it trusts that code as it trusts its own (allow_remote_model_code)."""
        asks = [n.node_id for n in self.nodes if n.engine_kwargs.get("trust_remote_code")]
        if self.engine.engine_kwargs.get("trust_remote_code"):
            asks = [n.node_id for n in self.nodes]
        if asks and not self.allow_remote_model_code:
            raise ValueError(
                f"node(s) {asks} set trust_remote_code: a model repository's code would run inside this "
                "network's Ray cluster, where it can call every control-plane actor (ledger, registry, "
                "settlement, validators). Serve such a model as an operator's open node (`meritnet node serve`, its own Ray), "
                "or set allow_remote_model_code: true if you audited that code"
            )
        return self

    @model_validator(mode="after")
    def _unique_nodes(self) -> NetworkConfig:
        seen: set[str] = set()
        for node in self.nodes:
            if node.node_id in seen:
                raise ValueError(
                    f"node id {node.node_id!r} appears twice in 'nodes'; node ids must be unique"
                )
            seen.add(node.node_id)
        return self

    @model_validator(mode="after")
    def _one_task_per_model(self) -> NetworkConfig:
        both = sorted(set(self.trusted_models) & set(self.embedding_models))
        tasks: dict[str, set[str]] = {}
        for node in self.nodes:
            tasks.setdefault(node.model_id, set()).add(node.task)
        mixed = sorted(m for m, t in tasks.items() if len(t) > 1)
        if both or mixed:
            raise ValueError(
                f"model(s) {both or mixed} are both generation and embeddings models: a model id is one or "
                "the other (its nodes' 'task', and 'trusted_models' or 'embedding_models')"
            )
        return self

    @model_validator(mode="after")
    def _unique_validators(self) -> NetworkConfig:
        ids = [v.validator_id for v in self.validators]
        twice = sorted({v for v in ids if ids.count(v) > 1})
        if twice:
            raise ValueError(
                f"validator id(s) {twice} appear twice in 'validators'; validator ids must be unique"
            )
        return self

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> NetworkConfig:
        data: dict[str, Any] = {}
        if path is not None:
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

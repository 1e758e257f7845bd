"""Settings of the gateway deployment (routing/gateway.py, routing/app.py)."""

from __future__ import annotations

import secrets

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cluster import services
from routing.intake import IntakeLimits
from routing.metering import MeteredModel
from routing.timeouts import Timeouts


class ModelPrice(BaseModel):
    """What a model's tokens cost a client, as the catalogue (/v1/models) states it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_million: float = Field(ge=0, description="Price of one million prompt tokens.")
    output_per_million: float = Field(ge=0, description="Price of one million completion tokens.")
    currency: str = Field(default="USD", min_length=1, max_length=16, description="What the prices are in.")


class GatewayConfig(BaseModel):
    """Settings of the gateway deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry_name: str = Field(default=services.REGISTRY, description="Name of the node registry actor.")
    usage_sink_name: str | None = Field(
        default=services.USAGE_STORE, description="Name of the Ray actor that stores usage records durably."
    )
    consensus_name: str = Field(
        default=services.CONSENSUS,
        description="Named actor whose latest() gives the consensus QualityScores (absent: all nodes unscored).",
    )
    namespace: str = Field(
        default=services.NAMESPACE, description="Ray namespace of the registry and the sink."
    )
    refresh_interval_s: float = Field(
        default=0.5, gt=0, description="How often the local node snapshot is refreshed from the registry."
    )
    max_attempts: int = Field(default=3, ge=1, le=10, description="Nodes tried per request before giving up.")
    timeouts: Timeouts = Field(
        default_factory=lambda: Timeouts(), description="How long a node may take (first byte, gaps, total)."
    )
    router_config: str | None = Field(
        default=None, description="Path of the routing profile YAML; None uses deploy/profiles/default.yaml."
    )
    api_keys: tuple[SecretStr, ...] = Field(
        default=(),
        description="Bearer keys from config (unlimited); with none here and none in keys_file "
        "the endpoint is open (local use).",
    )
    pricing: dict[str, ModelPrice] = Field(
        default_factory=dict, description="model id -> its price, shown in /v1/models (no entry: null)."
    )
    cors_origins: tuple[str, ...] = Field(
        default=(), description="Origins allowed to call the endpoint from a browser (CORS); none by default."
    )
    keys_file: str | None = Field(
        default=None,
        description="The key store of `meritnet keys` (hashed keys with limits), re-read on change.",
    )
    challenge_keys: tuple[SecretStr, ...] = Field(
        default=(), description="Keys validators use to target a node with the 'x-meritnet-node' header."
    )
    capture_token_ids: bool = Field(
        default=True,
        description="Ask every node for its token ids (stripped for clients that did not ask), "
        "so challenges and shadow-verified requests look like all others to a node.",
    )
    shadow_feed_name: str = Field(
        default=services.SHADOW_FEED,
        description="Named actor that takes organic completions for shadow verification (absent: none offered).",
    )
    shadow_rate: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Share of verifiable organic requests offered to validators.",
    )
    tool_call_parser: str | None = Field(
        default="pythonic",
        description="The tool parser every node runs (deploy sets it from the nodes' serving arguments, "
        "cluster.structured.replayed_parser): tool calls are offered for shadow verification with it. "
        "None: they are not.",
    )
    intake: IntakeLimits = Field(
        default_factory=IntakeLimits, description="Body size, nesting and parameter caps of one request."
    )
    metered_models: dict[str, MeteredModel] = Field(
        default_factory=dict,
        description="model id -> its tokenizer, so the gateway counts prompt and completion tokens itself "
        "(routing/metering.py). A model without one is metered from the node's ids and clamped report.",
    )
    settlement_name: str = Field(
        default=services.SETTLEMENT,
        description="Named settlement actor (operators' rewards; absent: none).",
    )
    chain_id: int = Field(
        default=0,
        ge=0,
        description="Chain id of the network's settlement chain: open nodes sign registrations for it.",
    )
    network_id: str = Field(
        default_factory=lambda: "0x" + secrets.token_hex(32),
        pattern=r"^0x[0-9a-f]{64}$",
        description="The network's id, the salt of open nodes' registrations (deploy keeps it in state.json).",
    )
    admit_open_nodes: bool = Field(
        default=True,
        description="Accept signed registrations of open nodes at POST /v1/nodes (routing/admission.py).",
    )
    shadow_key: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_hex(16)),
        description="Key of the shadow sample's hash (random per gateway unless set); nodes never see it.",
    )

    def models_of(self, task: str) -> set[str]:
        """The metered models whose nodes serve `task` ('generate' or 'embed')."""
        return {m for m, spec in self.metered_models.items() if spec.task == task}

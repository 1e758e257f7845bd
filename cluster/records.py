"""The network's shared vocabulary: plain frozen records that cross package and actor boundaries.

Every package (routing, scoring, settlement, deploy) speaks in these types; none of them
imports another package's internals. Anything a peer reports about itself is parsed into
these strict types, so NaN, negative counts and malformed addresses never get further.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from eth_utils import is_checksum_address
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from cluster.completions import MAX_COUNT

_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A last label like this makes the host an IP address in another spelling (127.1, 0x7f000001): no
# top-level domain is all digits, and resolvers read such a host as the address it spells.
NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _checksum_address(value: str) -> str:
    if not is_checksum_address(value):
        raise ValueError(
            f"{value!r} is not an EIP-55 checksummed Ethereum address; "
            "write it with mixed-case checksum (eth_utils.to_checksum_address gives it)"
        )
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number (NaN and infinity are rejected)")
    return value


def _node_id(value: str) -> str:
    if not _NODE_ID.match(value):
        raise ValueError(
            f"{value!r} is not a valid node id: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return value


def dns_name(value: str) -> str:
    """`value` if it is a lowercase ASCII DNS host name (what a TLS certificate names), else ValueError."""
    labels = value.split(".")
    if (
        len(value) > 253
        or not all(_DNS_LABEL.match(label) for label in labels)
        or NUMERIC_LABEL.fullmatch(labels[-1])
    ):
        raise ValueError(
            f"{value!r} is not a DNS host name: use lowercase ASCII letters, digits and '-' in dot-separated "
            "labels (an internationalised name in its xn-- form), e.g. node.example.com"
        )
    return value


Address = Annotated[str, AfterValidator(_checksum_address)]
NodeId = Annotated[str, AfterValidator(_node_id)]
FiniteFloat = Annotated[float, AfterValidator(_finite)]
Unit = Annotated[float, Field(ge=0.0, le=1.0), AfterValidator(_finite)]
NodeTask = Literal["generate", "embed"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class NodeSpec(_Frozen):
    """One inference node an operator contributes: a model served on one accelerator type."""

    node_id: NodeId = Field(
        description="Unique id of the node in the network (also its Serve deployment name)."
    )
    operator: Address = Field(description="EIP-55 checksummed address that is paid for this node's work.")
    model_id: str = Field(
        min_length=1, max_length=256, description="Model name clients ask for, e.g. 'default'."
    )
    model_source: str = Field(
        min_length=1, description="Hugging Face model id or local path the engine loads the weights from."
    )
    accelerator_type: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Accelerator the node must run on (e.g. 'H100', 'L4'); placement is restricted to Ray "
        "nodes that advertise the resource 'accel_<type>'.",
    )
    task: NodeTask = Field(
        default="generate",
        description="What the node serves: 'generate' (chat and completions) or 'embed' (/v1/embeddings, the "
        "model run by vLLM as a pooling model).",
    )
    replicas: int = Field(default=1, ge=1, le=64, description="Number of Serve replicas of this node.")
    capacity: int = Field(
        default=8,
        ge=1,
        le=4096,
        description="Concurrent sequences one replica serves well; load is normalised by it so mixed GPUs "
        "compare fairly.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments (validated by vLLM itself when the engine starts).",
    )
    endpoint: str | None = Field(
        default=None,
        max_length=256,
        description="An *open* node's base URL (its operator runs it; the gateway calls it over HTTP with "
        "a per-node secret). None: a *managed* node, a Serve deployment in the network's own Ray cluster.",
    )
    tls_name: Annotated[str, AfterValidator(dns_name)] | None = Field(
        default=None,
        description="The host name of an open node whose https endpoint was given by name. The endpoint is "
        "recorded at the IP that name resolved to (so DNS cannot move the traffic later); every call goes "
        "to that IP and presents this name as TLS SNI, as the name the certificate must carry, and as "
        "the Host header. None: an http endpoint, or an https endpoint given as an IP address.",
    )

    @model_validator(mode="after")
    def _tls_name_needs_https(self) -> NodeSpec:
        if self.tls_name is not None and not (self.endpoint or "").startswith("https://"):
            raise ValueError("tls_name is the certificate name of an https endpoint; this node has none")
        return self

    @property
    def accelerator_resource(self) -> str:
        """The Ray custom resource that marks a Ray node as carrying this accelerator."""
        return f"accel_{self.accelerator_type}"


UsageStatus = Literal["ok", "error", "cancelled"]


class UsageRecord(_Frozen):
    """One metered interaction: what the gateway served, by whom, and how fast.

    Token counts equal the `usage` the client received. Hashes are sha256 hex of the request
    body the node saw and of the response text, so an interaction can be audited later
    without storing its content.
    """

    request_id: str = Field(min_length=1, max_length=128, description="Gateway request id (unique).")
    node_id: NodeId = Field(description="Node that served the request.")
    operator: Address = Field(description="Operator of that node (paid for it).")
    model: str = Field(min_length=1, description="Model id the client asked for.")
    prompt_tokens: int = Field(
        ge=0,
        le=MAX_COUNT,
        description="Prompt tokens, counted by the gateway (bounded: sums never overflow).",
    )
    completion_tokens: int = Field(
        ge=0, le=MAX_COUNT, description="Completion tokens, counted by the gateway from what it forwarded."
    )
    started_at: FiniteFloat = Field(description="Unix time (s) the gateway received the request.")
    ttft_s: FiniteFloat | None = Field(
        default=None, ge=0.0, description="Seconds from receipt to the first byte sent to the client."
    )
    ended_at: FiniteFloat = Field(description="Unix time (s) the last byte was sent.")
    status: UsageStatus = Field(description="'ok' when completed; 'error' / 'cancelled' otherwise.")
    key_id: str = Field(
        default="",
        max_length=64,
        description="Id of the client's API key (never the key); '' when none was needed.",
    )
    request_hash: str = Field(
        default="",
        pattern=r"^([0-9a-f]{64})?$",
        description="sha256 hex of the request body's bytes as sent.",
    )
    response_hash: str = Field(
        default="",
        pattern=r"^([0-9a-f]{64})?$",
        description="sha256 hex of the response body's bytes as got.",
    )


class NodeStats(_Frozen):
    """What the registry knows about a live node right now (refreshed in the background)."""

    node_id: NodeId
    model_id: str
    operator: Address
    accelerator_type: str
    capacity: int = Field(ge=1, description="Concurrent sequences per replica (NodeSpec.capacity).")
    live: bool = Field(description="True while the node's deployment has a running replica.")
    running_replicas: int = Field(ge=0)
    in_flight: int = Field(default=0, ge=0, description="Requests the gateways have outstanding on it.")
    joined_at: FiniteFloat = Field(description="Unix time the node joined the network.")
    kind: Literal["managed", "open"] = Field(
        default="managed", description="Managed (the runner's Ray cluster) or open (an operator's machine)."
    )
    task: NodeTask = Field(default="generate", description="What the node serves (NodeSpec.task).")


class NodeScore(_Frozen):
    """One validator's current view of one node."""

    validator: str = Field(min_length=1)
    node_id: NodeId
    integrity: Unit = Field(description="Verification pass rate, with a hard drop on clear fraud.")
    availability: Unit | None = Field(description="Challenge success rate (None: not challenged yet).")
    speed: Unit | None = Field(
        description="TTFT and tokens/s relative to the model's fleet median (None: not measured yet)."
    )
    score: Unit = Field(description="Smoothed combination of the three, what the validator weights by.")
    at: FiniteFloat = Field(description="Unix time of the last update.")


class QualityScores(_Frozen):
    """Consensus quality per node in [0,1]; absent nodes are unscored (on probation)."""

    epoch: int = Field(ge=0, description="Consensus round the scores come from.")
    quality: dict[str, Unit] = Field(default_factory=dict, description="node_id -> consensus quality.")


# The longest response_format schema (characters) of a request offered for shadow verification: the
# validator compiles it into a grammar, so a client's schema must stay small to be replayed.
MAX_SHADOW_SCHEMA = 8192


class ToolUse(_Frozen):
    """A request with tools. Named or required (`tool_choice`): vLLM decodes the call under a JSON schema
    made from the tools, then parses it into the tool calls the client gets; auto: the node's tool parser
    reads calls out of free text. Validators replay the schema (if any) and check that the calls the
    client got are what the node's tokens say (scoring.verify)."""

    mode: Literal["named", "required", "auto"]
    name: str | None = Field(default=None, max_length=256, description="The named function (mode 'named').")
    parser: str | None = Field(
        default=None, max_length=64, description="The nodes' tool parser, which reads an auto call's text."
    )
    tools: tuple[dict[str, Any], ...] = Field(
        max_length=128, description="The request's tools as vLLM hands them to the chat template."
    )
    calls: tuple[tuple[str, str], ...] = Field(
        max_length=128, description="(name, arguments) of each tool call the client got."
    )


class ServedCompletion(_Frozen):
    """One organic completion offered for shadow verification (content, so it never goes to logs or disk).

    The gateway offers a keyed-hash sample of completed organic requests; validators re-verify them
    after the fact exactly as they verify their own challenges. Exactly one of `prompt` (completions)
    and `messages` (chat, plain-text contents) is set.
    """

    request_id: str = Field(min_length=1, max_length=128)
    node_id: NodeId
    model: str = Field(min_length=1)
    prompt: str | None = Field(default=None, description="Completions prompt.")
    messages: tuple[dict[str, str], ...] | None = Field(
        default=None, description="Chat messages (role, content)."
    )
    text: str = Field(description="Completion text the client received (choice 0).")
    token_ids: tuple[int, ...] | None = Field(default=None, description="Completion ids the node reported.")
    completion_tokens: int = Field(ge=0, description="usage.completion_tokens as reported.")
    finish_reason: str | None = None
    max_tokens: int | None = Field(
        default=None, ge=1, description="The request's limit; None = engine default."
    )
    temperature: float = Field(
        default=1.0, ge=0.0, description="The request's temperature (OpenAI default 1)."
    )
    stop_strings: bool = Field(default=False, description="The request set stop strings.")
    temperature_set: bool = Field(default=True, description="The request set its temperature explicitly.")
    seed: int | None = Field(
        default=None, ge=-(2**63), lt=2**63, description="The request's sampling seed (the gateway sets one)."
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="The request's top_p, if set.")
    top_k: int | None = Field(default=None, ge=-1, description="The request's top_k, if set.")
    stream: bool = Field(default=False, description="The request was streamed.")
    json_schema: str | None = Field(
        default=None,
        max_length=MAX_SHADOW_SCHEMA,
        description="The JSON schema the answer was decoded under (response_format json_schema or "
        "json_object, or a named or required tool call's, as vLLM compiles it); None: free text.",
    )
    tool_use: ToolUse | None = Field(default=None, description="A named or required tool call's request.")


SHADOW_EMBED_INPUTS = 16  # the most inputs of an embeddings request offered for shadow verification


class ServedEmbedding(_Frozen):
    """One organic embeddings answer offered for shadow verification: its text inputs and the vectors the
    client got (content, so it never goes to logs or disk). Validators recompute the vectors on their
    own engine of the trusted weights and judge them as they judge a challenge's (scoring.embeddings)."""

    request_id: str = Field(min_length=1, max_length=128)
    node_id: NodeId
    model: str = Field(min_length=1)
    inputs: tuple[str, ...] = Field(min_length=1, max_length=SHADOW_EMBED_INPUTS)
    vectors: tuple[tuple[float, ...], ...] = Field(description="One vector per input, in input order.")

    @model_validator(mode="after")
    def _one_vector_per_input(self) -> ServedEmbedding:
        if len(self.vectors) != len(self.inputs):
            raise ValueError(f"{len(self.vectors)} vectors for {len(self.inputs)} inputs")
        return self


def keyed_sample(key: bytes, item_id: str, rate: float) -> bool:
    """Bernoulli(rate) decided by a keyed hash of `item_id`: reproducible with the key, unpredictable
    without it (nodes never see the key, so they cannot tell which requests get verified)."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    h = hashlib.blake2b(item_id.encode(), key=key[:64], digest_size=8).digest()
    return int.from_bytes(h, "big") < rate * 2**64


def deployment_name(spec: NodeSpec) -> str:
    """Serve application and deployment name of a node (one application per node)."""
    return deployment_name_for_id(spec.node_id)


def deployment_name_for_id(node_id: str) -> str:
    return f"node-{node_id}"


@dataclass(frozen=True)
class NodeLink:
    """How a gateway reaches an open node: its endpoint (pinned to an IP), the secret it presents there
    and, for an https endpoint given by name, that name (cluster/pinned_http.py)."""

    endpoint: str
    secret: str
    tls_name: str | None = None

"""Signed node registration: how an operator brings a node of their own (an *open* node) to a network.

A registration is EIP-712 typed data signed with the operator's Ethereum key. The address it recovers
to must be the `operator` the message names, and that address is who the network pays for the node's
work: nobody can register a node in someone else's name, or redirect another operator's pay.

Replays are refused by a per-operator nonce that must grow with every message (the CLI uses the
time in nanoseconds), and every message expires within `MAX_VALIDITY_S`, so a captured message is
useless after a few minutes even on a network that has not seen it. The domain names the network's
chain id and the network's own id (its salt), so a registration for one network is refused by every
other, on the same chain too.

Checks that need state (nonces, who holds a node id) live in the registry (cluster/registry.py);
checks that need the network (health and model probes) in the gateway (routing/admission.py).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.messages import encode_typed_data
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cluster.records import Address, NodeId

DOMAIN_NAME = "meritnet"
DOMAIN_VERSION = "1"
MAX_VALIDITY_S = 600  # a signed message is accepted at most this long after it was made
UINT256 = (1 << 256) - 1

_FIELDS = [
    {"name": "action", "type": "string"},
    {"name": "nodeId", "type": "string"},
    {"name": "operator", "type": "address"},
    {"name": "model", "type": "string"},
    {"name": "accelerator", "type": "string"},
    {"name": "endpoint", "type": "string"},
    {"name": "capacity", "type": "uint32"},
    {"name": "chainId", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "expiry", "type": "uint64"},
]
_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "salt", "type": "bytes32"},  # the network's id: networks on one chain do not share messages
]


class RegistrationError(ValueError):
    """A registration the network refuses; `status` is the HTTP status the gateway answers with."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _endpoint(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL with a host, e.g. http://203.0.113.7:8100")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path:
        raise ValueError("the endpoint is a bare base URL: no credentials, path, query or fragment")
    try:
        parts.port  # noqa: B018 - raises for a port outside 0-65535
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    return value


Endpoint = Annotated[str, Field(max_length=256), AfterValidator(_endpoint)]


class Registration(BaseModel):
    """What the operator signs. `action` is 'join' or 'leave' (a leave's node fields are ignored but
    signed, so one message type serves both)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    action: Literal["join", "leave"] = Field(description="Join the network, or leave it.")
    node_id: NodeId = Field(
        description="The node's id in the network (also its name in metrics and records)."
    )
    operator: Address = Field(description="The signing address: paid for the node's work.")
    model: str = Field(default="", max_length=256, description="Model id the node serves (join).")
    accelerator: str = Field(
        default="", max_length=64, pattern=r"^[A-Za-z0-9_-]*$", description="Accelerator type, e.g. H100."
    )
    endpoint: Endpoint | Literal[""] = Field(
        default="", description="Base URL where the gateway reaches the node (join)."
    )
    capacity: int = Field(default=8, ge=1, le=4096, description="Concurrent sequences the node takes.")
    chain_id: int = Field(ge=0, le=UINT256, description="Chain id of the network's settlement chain.")
    network_id: str = Field(
        pattern=r"^0x[0-9a-f]{64}$", description="The network's id (GET /v1/nodes/domain): the EIP-712 salt."
    )
    nonce: int = Field(ge=0, le=UINT256, description="Larger than every earlier nonce of this operator.")
    expiry: int = Field(ge=0, lt=1 << 64, description="Unix time after which the message is refused.")


class SignedRegistration(BaseModel):
    """The body of POST /v1/nodes (join) and POST /v1/nodes/leave."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    registration: Registration
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$", description="65-byte signature, hex.")


def typed_data(reg: Registration) -> dict:
    """The EIP-712 message for `reg` (what eth-account, a wallet or a hardware key signs)."""
    return {
        "types": {"EIP712Domain": _DOMAIN, "NodeRegistration": _FIELDS},
        "primaryType": "NodeRegistration",
        "domain": {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": reg.chain_id,
            "salt": reg.network_id,
        },
        "message": {
            "action": reg.action,
            "nodeId": reg.node_id,
            "operator": reg.operator,
            "model": reg.model,
            "accelerator": reg.accelerator,
            "endpoint": reg.endpoint,
            "capacity": reg.capacity,
            "chainId": reg.chain_id,
            "nonce": reg.nonce,
            "expiry": reg.expiry,
        },
    }


def sign(reg: Registration, account) -> SignedRegistration:
    """Sign with an eth-account LocalAccount (or anything with its `sign_typed_data`, e.g. SettlerKey)."""
    signed = account.sign_typed_data(full_message=typed_data(reg))
    return SignedRegistration(registration=reg, signature="0x" + bytes(signed.signature).hex())


def verify(
    signed: SignedRegistration, chain_id: int, network_id: str, now: float | None = None
) -> Registration:
    """The registration, if it is for this network, not expired, and signed by its operator.
    Raises RegistrationError otherwise (nonces and node ownership: the registry checks those)."""
    reg = signed.registration
    now = time.time() if now is None else now
    if reg.chain_id != chain_id:
        raise RegistrationError(
            400,
            f"signed for chain {reg.chain_id}, but this network settles on chain {chain_id}",
            "wrong_chain",
        )
    if reg.network_id != network_id:
        raise RegistrationError(
            400, "signed for another network (GET /v1/nodes/domain gives this one's id)", "wrong_network"
        )
    if reg.expiry < now:
        raise RegistrationError(400, "the registration has expired; sign a fresh one", "expired")
    if reg.expiry > now + MAX_VALIDITY_S:
        raise RegistrationError(
            400, f"the registration expires too late: at most {MAX_VALIDITY_S} s from now", "expiry_too_far"
        )
    if reg.action == "join" and not (reg.model and reg.accelerator and reg.endpoint):
        raise RegistrationError(400, "a join names the model, the accelerator and the endpoint", "incomplete")
    try:
        signer = Account.recover_message(
            encode_typed_data(full_message=typed_data(reg)), signature=bytes.fromhex(signed.signature[2:])
        )
    except Exception:  # noqa: BLE001 - any malformed signature is the same refusal
        signer = None
    if signer != reg.operator:
        raise RegistrationError(
            401, "the signature does not recover to the operator the registration names", "bad_signature"
        )
    return reg

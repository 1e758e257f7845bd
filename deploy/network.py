"""Start and stop a whole meritnet on this machine: cluster, registry, usage store, nodes, gateway.

Used by `meritnet up`, the integration tests and the benchmarks, so all three run the same network.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster.deployment import build_node_app
from cluster.local import AUTH_TOKEN_FILE, RAY_ADDRESS_FILE, ExistingCluster, LocalCluster
from cluster.records import NodeSpec, deployment_name
from deploy.config import NetworkConfig, resolve_model_source
from deploy.errors import NetworkStartError
from deploy.localchain import ANVIL, NetworkAnvil
from deploy.plane import gateway_config, start_control_plane
from deploy.scoring import (
    start_consensus,
    start_reference_engines,
    start_shadow_feed,
    start_validators,
    validator_keys,
)
from deploy.signer import SETTLER, SignerProcess
from deploy.usage import SETTLEMENT_NAME, VALIDATOR_KEYS_DIR, settlement_chain, settler_key_path
from routing.app import gateway_deployment
from settlement.keys import KEY_ENV, KEY_FILE_ENV

GATEWAY_APP = "meritnet"

Step = Callable[[str], None]  # progress callback: a human-readable step name


def prepare_state(state_dir: Path, chain_url: str, fresh: bool = True) -> float:
    """Create the state folder and return the network's genesis (unix time of epoch 0).

    Genesis is fixed at the first start and kept in state.json, because epochs are numbered from
    it and settle strictly in order. The embedded chain lives only as long as its settlement actor, so
    on a `fresh` start with it the ledger and reward book start afresh too (an old state is moved aside);
    `fresh=False` keeps the state of a network whose settlement actor is still running.
    """
    state_file = state_dir / "state.json"
    if fresh and chain_url == "embedded" and state_file.exists():
        old = state_dir.with_name(state_dir.name + ".previous")
        shutil.rmtree(old, ignore_errors=True)
        state_dir.rename(old)
    state_dir.mkdir(parents=True, exist_ok=True)
    if state_file.exists():
        return float(json.loads(state_file.read_text())["genesis"])
    genesis = float(int(time.time()))
    state_file.write_text(json.dumps({"genesis": genesis, "chain_url": chain_url}))
    return genesis


def wait_running(apps: list[str], timeout_s: float) -> None:
    """Wait until every Serve application in `apps` is RUNNING; NetworkStartError (with the failed
    app's message and what to do) if one fails or time runs out."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = serve.status().applications
        states = {
            a: str(getattr(statuses[a].status, "value", statuses[a].status)) if a in statuses else "NEW"
            for a in apps
        }
        failed = [a for a, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            msg = "; ".join(f"{a}: {statuses[a].message[-600:]}" for a in failed)
            raise NetworkStartError(
                f"node deployment failed: {msg}\nCheck the node's model_source and engine_kwargs; "
                "set MERITNET_RAY_LOGS=1 to see engine logs."
            )
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(1.0)
    raise NetworkStartError(
        f"nodes did not become ready within {timeout_s:.0f}s: {states}. A large model on a cold cluster "
        "may need longer: pass --start-timeout SECONDS (start_timeout_s in the network YAML)."
    )


def network_id(state_dir: Path) -> str:
    """The network's id (0x + 32 random bytes, kept in state.json beside genesis): the salt of its node
    registrations, so a message signed for one network is refused by every other, on the same chain too."""
    state_file = state_dir / "state.json"
    state = json.loads(state_file.read_text())
    if "network_id" not in state:
        state["network_id"] = "0x" + secrets.token_hex(32)
        state_file.write_text(json.dumps(state))
    return state["network_id"]


@dataclass
class LocalNetwork:
    """A running local network. Use as a context manager or call start()/stop()."""

    config: NetworkConfig
    on_step: Step = lambda _msg: None
    specs: list[NodeSpec] = field(default_factory=list)
    cluster: LocalCluster | ExistingCluster | None = None

    genesis: float = 0.0
    settlement: object | None = None  # the settlement actor handle, when enabled
    clock: object | None = None  # settles due epochs every few seconds, when settlement is enabled
    usage_store: object | None = None
    validators: dict = field(default_factory=dict)  # validator actor name -> handle
    reference_engines: dict = field(default_factory=dict)  # model -> shared reference engine handle
    consensus: object | None = None  # the consensus actor handle, with validators
    shadow_feed: object | None = None  # organic completions offered to validators, with validators
    anvil: NetworkAnvil | None = None  # the local chain, with chain_url 'anvil'
    signer: SignerProcess | None = None  # holds the settler's and validators' keys, outside Ray
    challenge_key: str = ""  # per run; pins a request to one node (validators, the first-request check)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def ledger_path(self) -> Path:
        return self.config.state_dir / "usage.db"

    def settle_due_epochs(self) -> list[int]:
        """Close and settle every epoch that has ended (called on a timer by `meritnet up`)."""
        import ray

        if self.settlement is None:
            return []
        return ray.get(self.settlement.tick.remote())

    def start(self, timeout_s: float | None = None) -> LocalNetwork:
        """Start everything; wait up to `timeout_s` (default: the config's start_timeout_s) for the nodes."""
        from ray import serve
        from ray.serve import RunTarget

        cfg = self.config
        if os.environ.get(KEY_ENV):
            raise NetworkStartError(
                f"${KEY_ENV} is set: every Ray worker (vLLM processes included) would inherit the settler key. "
                f"Put the key in a file (chmod 600), set ${KEY_FILE_ENV} to its path, and unset ${KEY_ENV}."
            )
        self.on_step("Building models")
        self.specs = [n.to_spec(resolve_model_source) for n in cfg.nodes]

        self.genesis = prepare_state(cfg.state_dir, cfg.chain_url)  # before Ray: the token file lives there
        if cfg.chain_url == ANVIL:  # before Ray too, so no Ray process takes its port
            self.anvil = NetworkAnvil(cfg.state_dir).start()
        if cfg.signer_socket is None and (cfg.settlement or cfg.validators):  # before Ray: not its child
            self.signer = self._start_signer()
        signer_socket = cfg.signer_socket or (self.signer.socket_path if self.signer else None)
        if cfg.ray_address:
            self.on_step(f"Connecting to the Ray cluster at {cfg.ray_address}")
            apps = [GATEWAY_APP, *(deployment_name(s) for s in self.specs)]
            self.cluster = ExistingCluster(cfg.ray_address, apps, cfg.cluster).start()
        else:
            self.on_step("Starting the Ray cluster (token authentication on)")
            self.cluster = LocalCluster({s.accelerator_type for s in self.specs}, cfg.cluster).start(
                auth_token_file=cfg.state_dir / AUTH_TOKEN_FILE
            )
        # `meritnet status` finds this cluster by it, not by guessing among the machine's Ray instances
        (cfg.state_dir / RAY_ADDRESS_FILE).write_text(self.cluster.address)
        serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})

        import ray

        self.on_step("Starting the control plane (registry, usage ledger, settlement)")
        plane = start_control_plane(cfg, self.specs, self.genesis, signer_socket)
        self.usage_store, self.settlement, self.clock = plane.usage_store, plane.settlement, plane.clock

        self.on_step(f"Loading {len(self.specs)} vLLM engines")
        engine = cfg.engine
        if not cfg.ray_address and engine.direct_http_host is None:  # one machine: nodes answer on loopback
            engine = engine.model_copy(update={"direct_http_host": "127.0.0.1"})
        serve.run_many(
            [
                RunTarget(build_node_app(s, engine), name=deployment_name(s), route_prefix=None)
                for s in self.specs
            ],
            wait_for_applications_running=False,
        )

        scoring_sources, embedding_sources, scoring_engine = (
            self._start_reference_engines()
        )  # beside the nodes
        wait_running([deployment_name(s) for s in self.specs], timeout_s or cfg.start_timeout_s)

        self.on_step("Starting the gateway")
        self.challenge_key = challenge_key = secrets.token_hex(16)  # per run; only validators know it
        shadow = bool(cfg.validators) and cfg.shadow_rate > 0
        if shadow:
            self.shadow_feed = start_shadow_feed()
        chain_id = ray.get(self.settlement.status.remote())["chain_id"] if self.settlement else 0
        gw = gateway_config(cfg, chain_id, network_id(cfg.state_dir), challenge_key, shadow)
        serve.run(gateway_deployment(gw), name=GATEWAY_APP, route_prefix="/")
        self._wait_live(plane.registry, timeout_s=60)
        self.on_step("Sending each node its first request")
        self.check_nodes()

        if cfg.validators:
            self.on_step(f"Starting {len(cfg.validators)} validator(s) and consensus")
            # Handles are kept on the network: Ray ends a non-detached actor with its last handle.
            keys = validator_keys(cfg.validators, cfg.state_dir / VALIDATOR_KEYS_DIR)
            self.validators = start_validators(
                cfg.validators,
                signer_socket,
                self.base_url,
                challenge_key,
                scoring_sources,
                scoring_engine,
                self.reference_engines or None,
                shadow=shadow,
                embedding_sources=embedding_sources,
            )
            self.consensus = start_consensus(
                cfg.validators,
                {v: k.address for v, k in keys.items()},  # stakes and addresses: config, never the actors
                cfg.consensus_period_s,
                cfg.epoch_length_s,
                self.genesis,
                SETTLEMENT_NAME if cfg.settlement else None,
                cfg.scoring_metrics_port,
                activity_cutoff_s=cfg.consensus_activity_cutoff_s,
                bonds_path=cfg.state_dir / "consensus-bonds.json",
            )
        return self

    def _start_signer(self) -> SignerProcess:
        """The signer process (deploy/signer.py) with the settler's key and each validator's."""
        cfg = self.config
        keys = {
            v: k.path for v, k in validator_keys(cfg.validators, cfg.state_dir / VALIDATOR_KEYS_DIR).items()
        }
        chain = settlement_chain(cfg) if cfg.settlement else None
        if chain is not None:
            keys[SETTLER] = settler_key_path(cfg)
        try:
            return SignerProcess(cfg.state_dir / "signer" / "signer.sock", keys, chain).start()
        except (OSError, RuntimeError) as exc:
            raise NetworkStartError(f"the signer did not start: {exc}") from None

    def _start_reference_engines(self) -> tuple[dict[str, str], dict[str, str], dict]:
        """With validators: resolve the trusted models (generation, and the embeddings models a node here
        serves) and, if shared, start their engines now."""
        cfg = self.config
        if not cfg.validators:
            return {}, {}, {}
        sources = {m: resolve_model_source(src) for m, src in cfg.trusted_models.items()}
        served = {n.model_id for n in cfg.nodes if n.task == "embed"}
        embedding = {m: resolve_model_source(src) for m, src in cfg.embedding_models.items() if m in served}
        engine = {"max_model_len": cfg.engine.max_model_len, **cfg.engine.engine_kwargs}
        if cfg.shared_reference_engine:
            self.reference_engines = start_reference_engines(sources, engine, embedding)
        return sources, embedding, engine

    def _wait_live(self, registry, timeout_s: float) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [s for s in ray.get(registry.snapshot.remote()) if s.live and s.kind == "managed"]
            if len(live) == len(self.specs):
                return
            time.sleep(0.5)
        raise NetworkStartError("nodes are running but the registry does not see them live")

    def check_nodes(self) -> None:
        """Every managed node answers an ordinary first request, pinned to it: a sampled completion of 2
        tokens (an embeddings node: one vector). On an AVX-512 Xeon exactly this request once killed every cold engine (issue 25), so a
        network that cannot serve it fails here, at start, with the engine's own log, instead of on a
        user's first request. NetworkStartError names each node that failed."""
        self._wait_routed()
        failed = [f"{spec.node_id}: {why}" for spec in self.specs if (why := self._first_request(spec))]
        if failed:
            tails = "\n".join(engine_log_tail(deployment_name(s)) for s in self.specs)
            raise NetworkStartError(
                "a node failed its first request: " + "; ".join(failed) + "\n" + tails + "\nThe engine's "
                "log is above; run `meritnet up` again, and report the CPU (lscpu) if it happens again."
            )

    def _wait_routed(self, timeout_s: float = 60.0) -> None:
        """Until the HTTP ingress routes to the gateway: Serve's proxy learns a new application's route a
        moment after it is RUNNING and answers 404 'Path ... not found' meanwhile (seen on a cluster
        meritnet did not start)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=10).status_code != 404:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def _first_request(self, spec: NodeSpec) -> str | None:
        """Why `spec`'s first request failed, or None when it was answered."""
        import httpx

        if spec.task == "embed":
            route, body = "embeddings", {"model": spec.model_id, "input": "before"}
        else:  # sampled: temperature 1
            route, body = "completions", {"model": spec.model_id, "prompt": "before", "max_tokens": 2}
        headers = {"x-meritnet-node": spec.node_id, "x-meritnet-challenge-key": self.challenge_key}
        if self.config.api_keys:
            headers["authorization"] = f"Bearer {self.config.api_keys[0].get_secret_value()}"
        try:
            r = httpx.post(f"{self.base_url}/v1/{route}", json=body, headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            return f"no answer ({type(exc).__name__})"
        return None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:300]}"

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        if self.anvil is not None:
            self.anvil.stop()
            self.anvil = None
        if self.signer is not None:
            self.signer.stop()
            self.signer = None

    def __enter__(self) -> LocalNetwork:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def engine_log_tail(app: str, lines: int = 30) -> str:
    """The last `lines` of what the replica of Serve application `app` (a node: its vLLM engine and engine
    core write there) printed, from Ray's session logs; a note when it cannot be found."""
    from pathlib import Path

    import ray
    from ray.util.state import list_actors

    from cluster.local import state_address

    try:
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        actors = list_actors(
            address=state_address(),
            filters=[("class_name", "=", f"ServeReplica:{app}:{app}")],
            limit=100,
            detail=True,
        )
    except Exception as exc:  # noqa: BLE001 - a diagnostic: never hide the error it explains
        return f"({app}: no engine log: {type(exc).__name__})"
    files = [
        f for a in actors if a.pid for f in logs.glob(f"worker-*-{a.pid}.*") if f.suffix in (".out", ".err")
    ]
    if not files:
        return f"({app}: no engine log found under {logs})"
    pid = max(files, key=lambda f: f.stat().st_mtime).stem.rsplit("-", 1)[-1]
    tail = []
    for f in sorted(f for f in files if f.stem.endswith(f"-{pid}")):  # .err, then .out
        tail += f.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {app} (replica pid {pid}), last lines of its stderr and stdout ---\n" + "\n".join(tail)

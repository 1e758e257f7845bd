"""An operator's open node: their own Ray, the node's LLMServer and its HTTP ingress (`meritnet node serve`).

The node is the same ray.serve.llm LLMServer a managed node runs (cluster/deployment.py), reached
through the small ingress in cluster/node_http.py on the operator's Serve HTTP port. Without a Ray
address, a private Ray instance is started for it (own temp dir, ports chosen by Ray, no dashboard),
so it never shares a cluster with a network's control plane, even on the network runner's machine.

The node's state folder holds `node.json` (what `node join` registers by default) and, once joined,
`secret` (mode 0600), the secret the network presents on every request.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster.deployment import EngineDefaults, build_node_app
from cluster.local import RAY_SYSTEM_CONFIG, use_serve_fast_path
from cluster.node_http import INGRESS_NAME, node_ingress_app
from cluster.records import NodeSpec, NodeTask, deployment_name, deployment_name_for_id

NODE_APP_ID = "served"  # the node's own Serve app is `node-served`; the network names it at join
SECRET_FILE = "secret"
NODE_FILE = "node.json"
_NO_OPERATOR = "0x0000000000000000000000000000000000000000"  # the network learns the payee at join


@dataclass
class OpenNode:
    model: str
    accelerator: str
    port: int
    host: str = "127.0.0.1"
    advertise: str | None = None  # the URL a network calls (node serve --advertise); None: the bind itself
    source: str | None = None  # weights; default: the model id (builtin:default for 'default')
    capacity: int = 8
    task: NodeTask = "generate"  # 'embed': /v1/embeddings (vLLM's pooling runner)
    address: str | None = None
    state_dir: Path = Path(".meritnet-node")
    engine: EngineDefaults = field(default_factory=EngineDefaults)
    env_vars: dict[str, str] = field(default_factory=dict)
    on_step: Callable[[str], None] = lambda _msg: None
    _own_ray: bool = False

    @property
    def endpoint(self) -> str:
        """Where a network reaches the node: the advertised URL, else the address it binds. Never a guess
        from this machine's name (127.0.1.1 on Debian/Ubuntu, a private address behind NAT)."""
        return self.advertise or self.local_url

    @property
    def local_url(self) -> str:
        """The node's HTTP face as this machine reaches it (loopback for a wildcard bind)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        return f"http://{host}:{self.port}"

    def spec(self, source: str) -> NodeSpec:
        return NodeSpec(
            node_id=NODE_APP_ID,
            operator=_NO_OPERATOR,
            model_id=self.model,
            model_source=source,
            accelerator_type=self.accelerator,
            capacity=self.capacity,
            task=self.task,
        )

    def start(self, timeout_s: float = 900.0) -> OpenNode:
        import ray
        from ray import serve

        from deploy.network import resolve_model_source, wait_running

        self.on_step("Resolving the model")
        source = resolve_model_source(
            self.source or ("builtin:default" if self.model == "default" else self.model)
        )
        spec = self.spec(source)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.on_step("Starting Ray" if self.address is None else f"Connecting to Ray at {self.address}")
        runtime_env = {"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0", **use_serve_fast_path(), **self.env_vars}}
        if self.address is None:
            ray.init(
                # logical CPUs overcommitted, as in the network's local cluster: they only gate scheduling
                num_cpus=max(4, os.cpu_count() or 1),
                resources={spec.accelerator_resource: 1.0},
                include_dashboard=False,
                namespace="meritnet-node",
                runtime_env=runtime_env,
                log_to_driver=False,
                _temp_dir=tempfile.mkdtemp(prefix="mnode-"),  # short: Ray's socket paths must fit 107 bytes
                _system_config=RAY_SYSTEM_CONFIG,
            )
            self._own_ray = True
        else:
            ray.init(
                address=self.address, namespace="meritnet-node", runtime_env=runtime_env, log_to_driver=False
            )
        serve.start(proxy_location="HeadOnly", http_options={"host": self.host, "port": self.port})
        self.on_step("Loading the vLLM engine")
        name = deployment_name(spec)
        serve.run(build_node_app(spec, self.engine), name=name, route_prefix=None, blocking=False)
        serve.run(
            node_ingress_app(self.model, name, (self.state_dir / SECRET_FILE).resolve()),
            name=INGRESS_NAME,
            route_prefix="/",
            blocking=False,
        )
        wait_running([name, INGRESS_NAME], timeout_s)
        self._warm_up()
        (self.state_dir / NODE_FILE).write_text(
            json.dumps(
                {
                    "model": self.model,
                    "accelerator": self.accelerator,
                    "capacity": self.capacity,
                    "endpoint": self.endpoint,
                }
            )
        )
        return self

    def _warm_up(self) -> None:
        """One request through the proxy and ingress (refused: no secret yet). The first POST a fresh
        Serve app takes seconds to set up; here, not on the network's first call (its join probe)."""
        import httpx

        try:
            path = "embeddings" if self.task == "embed" else "completions"
            httpx.post(f"{self.local_url}/v1/{path}", json={}, timeout=120)
        except httpx.HTTPError:
            pass  # only a warm-up: the network's probes will tell if the node is unreachable

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if self._own_ray:
                serve.shutdown()
            else:  # someone else's cluster: remove only what this node deployed
                serve.delete(INGRESS_NAME)
                serve.delete(deployment_name_for_id(NODE_APP_ID))
        finally:
            ray.shutdown()

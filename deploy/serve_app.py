"""Application builders for a Serve config file: `serve deploy deploy/serve.yaml` onto a running Ray
cluster, or the same applications in a KubeRay RayService's `serveConfigV2`. The network is the one
`meritnet up --address` starts, described by the same network YAML, with no driver attached:

- `deploy.serve_app:network` starts (or finds again) the control plane on the head node (deploy/plane.py:
  registry, usage ledger, settlement and its clock) and returns the gateway application;
- `deploy.serve_app:node` returns one node's vLLM application; name it `node-<node_id>`: the registry
  follows each node's Serve application by that name.

Both take `args: {config: /absolute/path/network.yaml}` (or the YAML's mapping inline as `network:`).
The state folder must be an absolute path on the head node. Validators need a driver that stays
attached (they hold their reference engines): run a network with validators with `meritnet up`.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from cluster import services
from deploy.config import NetworkConfig, resolve_model_source


def _config(args: dict[str, Any]) -> NetworkConfig:
    path, inline = args.get("config"), args.get("network") or {}
    cfg = NetworkConfig.load(Path(path) if path else None, **inline)
    if not Path(cfg.state_dir).is_absolute():
        raise ValueError(
            f"state_dir is {str(cfg.state_dir)!r}: under `serve deploy` set it to an absolute path on the "
            "head node (the builders do not run in your working directory)."
        )
    return cfg


def network(args: dict[str, Any]):
    """The gateway application, after the control plane is up."""
    import ray

    from deploy.network import network_id, prepare_state
    from deploy.plane import gateway_config, start_control_plane
    from deploy.usage import SETTLEMENT_NAME
    from routing.app import gateway_deployment

    cfg = _config(args)
    if cfg.validators:
        raise ValueError(
            "this network has validators: they need a driver that stays attached; start it with "
            "`meritnet up --address ...` instead of `serve deploy`."
        )
    specs = [n.to_spec(resolve_model_source) for n in cfg.nodes]
    try:  # a rebuild (redeploy, controller restart) keeps the state of the settlement actor still running
        ray.get_actor(SETTLEMENT_NAME, namespace=services.NAMESPACE)
        running = True
    except ValueError:
        running = False
    genesis = prepare_state(Path(cfg.state_dir), cfg.chain_url, fresh=not running)
    plane = start_control_plane(cfg, specs, genesis)
    chain_id = ray.get(plane.settlement.status.remote(), timeout=120)["chain_id"] if plane.settlement else 0
    challenge_key = secrets.token_hex(16)  # no validators under serve deploy: nobody holds it
    return gateway_deployment(
        gateway_config(cfg, chain_id, network_id(Path(cfg.state_dir)), challenge_key, False)
    )


def node(args: dict[str, Any]):
    """The vLLM application of the node `args["node_id"]` of the network YAML."""
    from cluster.deployment import build_node_app

    cfg = _config(args)
    wanted = args.get("node_id")
    found = [n for n in cfg.nodes if n.node_id == wanted]
    if not found:
        raise ValueError(
            f"node_id {wanted!r} is not in the network's nodes: {[n.node_id for n in cfg.nodes]}"
        )
    return build_node_app(found[0].to_spec(resolve_model_source), cfg.engine)

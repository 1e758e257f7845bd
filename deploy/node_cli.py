"""`meritnet node ...`: run a node of your own and bring it to a network.

meritnet node serve --model default --accelerator CPU --port 8100        your node, on your Ray (CPU)
meritnet node serve --config node.yaml --host 0.0.0.0 --advertise URL  a GPU node from an LLMConfig YAML
meritnet node keygen --out operator.json                                 a new key (encrypted keystore)
meritnet node join --network URL --node-id ID --key-file KEY             register it (signed, EIP-712)
meritnet node leave --network URL --node-id ID --key-file KEY            take it out
meritnet node list --network URL                                         every node of a network
meritnet node rewards --network URL --operator 0x...                     your nodes and your rewards

What `node serve` reads (a node YAML and the flags) is checked in deploy/node_config.py.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deploy.node_config import (
    NodeConfigError,
    NodeSettings,
    advertised_endpoint,
    node_settings,
    read_node_yaml,
)

node_app = typer.Typer(help="Run a node of your own and join a network with it.", no_args_is_help=True)
console = Console()


class NodeTaskOption(enum.StrEnum):
    """`node serve --task`: what the node serves (cluster.records.NodeTask)."""

    generate = "generate"
    embed = "embed"


StateDir = typer.Option(
    Path(".meritnet-node"), "--state-dir", help="The node's state folder (secret, node.json)."
)
Network = typer.Option(..., "--network", help="The network's endpoint, e.g. http://127.0.0.1:8000.")
KeyFile = typer.Option(
    ...,
    "--key-file",
    help="Your Ethereum key, the payee: an encrypted keystore JSON (`node keygen`; passphrase prompted or "
    "from the file $MERITNET_KEY_PASSWORD_FILE names) or a hex key file; chmod 600.",
)
VALIDITY_S = 300  # a signed message is good for five minutes


def _is_loopback_url(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    name = urlsplit(url).hostname or ""
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@node_app.command("serve")
def serve(
    config: Path | None = typer.Option(
        None,
        "--config",
        help="The node as a ray.serve.llm LLMConfig YAML: model_loading_config, accelerator_type (a GPU "
        "type: the node uses GPUs), engine_kwargs, deployment_config, runtime_env.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model id the node serves, as the network names it (default: 'default')."
    ),
    accelerator: str | None = typer.Option(
        None, "--accelerator", help="Accelerator type, e.g. H100, L4 (or the config's accelerator_type)."
    ),
    port: int = typer.Option(8100, "--port", help="HTTP port the network calls the node on."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind (0.0.0.0 to be reachable; then pass --advertise)."
    ),
    advertise: str | None = typer.Option(
        None,
        "--advertise",
        help="The URL a network reaches the node at (http:// or https://), recorded for `node join`; "
        "required when --host is not loopback.",
    ),
    address: str | None = typer.Option(None, "--address", help="Your Ray cluster (default: a private one)."),
    source: str | None = typer.Option(
        None, "--source", help="Weights: HF id or path (default: the model id)."
    ),
    capacity: int | None = typer.Option(
        None, "--capacity", help="Concurrent sequences the node takes (vLLM max_num_seqs; default 8)."
    ),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Context length (engine_kwargs)."),
    task: NodeTaskOption = typer.Option(
        "generate",
        "--task",
        help="generate: chat and completions; embed: /v1/embeddings (the network must list the model "
        "among its embedding_models).",
    ),
    tensor_parallel_size: int | None = typer.Option(
        None, "--tensor-parallel-size", help="GPUs one replica shards over (engine_kwargs)."
    ),
    engine_kwargs: str | None = typer.Option(
        None, "--engine-kwargs", help='More vLLM engine arguments as JSON, e.g. \'{"quantization": "fp8"}\'.'
    ),
    state_dir: Path = StateDir,
) -> None:
    """Start your node (vLLM on ray.serve.llm) behind an HTTP endpoint and serve until Ctrl-C."""
    try:
        settings = _serve_settings(
            config, model, source, accelerator, capacity, max_model_len, tensor_parallel_size, engine_kwargs
        )
        settings = dataclasses.replace(settings, task=task.value)
        endpoint = advertised_endpoint(host, port, advertise)
    except NodeConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

    from deploy.errors import NetworkStartError
    from deploy.open_node import OpenNode

    node = OpenNode(
        model=settings.model,
        accelerator=settings.accelerator,
        port=port,
        host=host,
        advertise=endpoint,
        source=settings.source,
        capacity=settings.capacity,
        address=address,
        state_dir=state_dir,
        engine=settings.engine,
        env_vars=settings.env_vars,
        task=settings.task,
    )
    with console.status("Starting the node...") as status:
        node.on_step = lambda msg: status.update(f"{msg}...")
        try:
            node.start()
        except (NetworkStartError, KeyboardInterrupt) as exc:
            console.print(f"[red]The node did not start:[/red] {exc}")
            node.stop()
            raise typer.Exit(1) from None
    where = "GPU" if settings.uses_gpu else "CPU"
    console.print(
        f"Node ready at [bold]{endpoint}[/bold] ({settings.model} on {settings.accelerator}, {where}). "
        "Join a network with:"
    )
    console.print(
        f"  meritnet node join --network http://NETWORK:8000 --node-id my-node "
        f"--key-file operator.key --state-dir {state_dir}",
        soft_wrap=True,
        highlight=False,
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    with console.status("Stopping the node..."):
        node.stop()
    console.print("Stopped.")


def _serve_settings(
    config: Path | None,
    model: str | None,
    source: str | None,
    accelerator: str | None,
    capacity: int | None,
    max_model_len: int | None,
    tensor_parallel_size: int | None,
    engine_kwargs: str | None,
) -> NodeSettings:
    """`node serve`'s flags and optional config file, as one NodeSettings (NodeConfigError if not)."""
    extra: dict[str, Any] = {}
    if engine_kwargs:
        try:
            extra = json.loads(engine_kwargs)
        except ValueError as exc:
            raise NodeConfigError(
                f'--engine-kwargs is not JSON ({exc}); e.g. \'{{"dtype": "float16"}}\''
            ) from None
        if not isinstance(extra, dict):
            raise NodeConfigError(
                '--engine-kwargs is a JSON object of vLLM engine arguments, e.g. \'{"dtype": "float16"}\''
            )
    if max_model_len is not None:
        extra["max_model_len"] = max_model_len
    if tensor_parallel_size is not None:
        extra["tensor_parallel_size"] = tensor_parallel_size
    return node_settings(
        read_node_yaml(config) if config is not None else None,
        model=model,
        source=source,
        accelerator=accelerator,
        capacity=capacity,
        engine_kwargs=extra,
        where=str(config) if config is not None else "the flags",
    )


def _post(url: str, body: dict) -> dict:
    import httpx

    try:
        answer = httpx.post(url, json=body, timeout=30)
    except httpx.HTTPError as exc:
        console.print(
            f"[red]Could not reach {url} ({type(exc).__name__}).[/red] Is the network up at that address?"
        )
        raise typer.Exit(1) from None
    try:
        data = answer.json()
    except ValueError:
        data = {}
    if answer.status_code >= 400:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        console.print(f"[red]Refused ({answer.status_code}):[/red] {message or answer.text[:300]}")
        raise typer.Exit(1)
    return data


def _signed(network: str, key_file: Path, **fields) -> dict:
    import httpx
    from pydantic import ValidationError

    from cluster.registration import Registration, sign
    from settlement.keys import SettlerKey, SettlerKeyError

    try:
        key = SettlerKey.from_file(key_file, what="operator key")
    except SettlerKeyError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    try:
        domain = httpx.get(f"{network}/v1/nodes/domain", timeout=30).json()
        chain_id, net_id = int(domain["chain_id"]), str(domain["network_id"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        console.print(f"[red]{network} does not look like a meritnet endpoint (no /v1/nodes/domain).[/red]")
        raise typer.Exit(1) from None
    try:
        reg = Registration(
            operator=key.address,
            chain_id=chain_id,
            network_id=net_id,
            nonce=time.time_ns(),  # grows with every message: the network accepts each one once
            expiry=int(time.time()) + VALIDITY_S,
            **fields,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        console.print(f"[red]Invalid registration:[/red] {problems}")
        raise typer.Exit(2) from None
    return sign(reg, key).model_dump()


@node_app.command("keygen")
def keygen(
    out: Path = typer.Option(
        Path("operator.json"), "--out", help="Where to write the new key (never over an existing file)."
    ),
    plain: bool = typer.Option(
        False, "--plain", help="A hex key file instead of an encrypted keystore (test networks only)."
    ),
) -> None:
    """A new operator key: an eth-account encrypted keystore (passphrase asked twice, or the file
    $MERITNET_KEY_PASSWORD_FILE names), mode 600. Its address is where you are paid."""
    from settlement.keys import SettlerKey, SettlerKeyError, keystore_passphrase

    key = SettlerKey.generate()
    try:
        text = (
            key.export_hex()
            if plain
            else json.dumps(key.export_keystore(keystore_passphrase(out, confirm=True)))
        )
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except SettlerKeyError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except FileExistsError:
        console.print(
            f"[red]{out} exists; a key is never overwritten.[/red] Pass another --out.", highlight=False
        )
        raise typer.Exit(2) from None
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    console.print(
        f"Wrote {out} for [bold]{key.address}[/bold] (back it up: it is the only copy).", highlight=False
    )


@node_app.command("join")
def join(
    network: str = Network,
    node_id: str = typer.Option(
        ..., "--node-id", help="The node's id in the network (yours while you hold it)."
    ),
    key_file: Path = KeyFile,
    model: str | None = typer.Option(None, "--model", help="Model id (default: what `node serve` runs)."),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="Your node's URL as the network reaches it."
    ),
    accelerator: str | None = typer.Option(
        None, "--accelerator", help="Accelerator type (default: the node's)."
    ),
    capacity: int | None = typer.Option(
        None, "--capacity", help="Concurrent sequences (default: the node's)."
    ),
    state_dir: Path = StateDir,
) -> None:
    """Register your node with a network, signed with your key; you are paid at the key's address."""
    served = state_dir / "node.json"
    try:
        defaults = json.loads(served.read_text()) if served.is_file() else {}
    except ValueError:
        defaults = {}  # a damaged node.json: the flags must say it all
    fields = {
        "model": model or defaults.get("model"),
        "endpoint": endpoint or defaults.get("endpoint"),
        "accelerator": accelerator or defaults.get("accelerator"),
        "capacity": capacity or defaults.get("capacity", 8),
    }
    missing = [f"--{k}" for k, v in fields.items() if not v]
    if missing:
        console.print(
            f"[red]Missing {', '.join(missing)}[/red] (no node in {state_dir}: pass them, or `node serve` first)."
        )
        raise typer.Exit(2)
    network = network.rstrip("/")
    if _is_loopback_url(fields["endpoint"]) and not _is_loopback_url(network):
        console.print(
            f"[red]{escape(fields['endpoint'])} is this machine's loopback address; {network} cannot reach it.[/red] "
            "Pass --endpoint with the URL it can reach, or serve with --host 0.0.0.0 --advertise URL.",
            highlight=False,
        )
        raise typer.Exit(2)
    answer = _post(
        f"{network}/v1/nodes", _signed(network, key_file, action="join", node_id=node_id, **fields)
    )
    secret_path = state_dir / "secret"
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(answer["secret"])
    console.print(
        f"Joined: node [bold]{answer['node_id']}[/bold] serves {answer['model']}; paid to {answer['operator']}.\n"
        f"The network's secret is in {secret_path} (your node accepts only it). "
        f"See your traffic with `meritnet node list --network {network}` and rewards with "
        f"`meritnet node rewards --network {network} --operator {answer['operator']}`."
    )


@node_app.command("leave")
def leave(
    network: str = Network, node_id: str = typer.Option(..., "--node-id"), key_file: Path = KeyFile
) -> None:
    """Take your node out of a network (signed with the key it joined with)."""
    network = network.rstrip("/")
    _post(f"{network}/v1/nodes/leave", _signed(network, key_file, action="leave", node_id=node_id))
    console.print(f"Node {node_id} left {network}; it gets no more traffic.")


@node_app.command("list")
def list_nodes(network: str = Network) -> None:
    """Every node of a network: kind, operator, model, accelerator, liveness."""
    import httpx

    try:
        nodes = httpx.get(f"{network.rstrip('/')}/v1/nodes", timeout=30).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        console.print(f"[red]Could not list the nodes of {network}.[/red] Is the network up at that address?")
        raise typer.Exit(1) from None
    table = Table("node", "kind", "model", "accelerator", "live", "operator")
    for n in nodes:
        table.add_row(
            n["node_id"],
            n["kind"],
            n["model_id"],
            n["accelerator_type"],
            "yes" if n["live"] else "no",
            n["operator"],
        )
    console.print(table)


@node_app.command("rewards")
def rewards(
    network: str = Network,
    operator: str = typer.Option(..., "--operator", help="Your payout address (the key you joined with)."),
) -> None:
    """Your nodes in a network, and what you have earned through the last settled epoch."""
    import httpx

    try:
        answer = httpx.get(f"{network.rstrip('/')}/v1/operators/{operator}", timeout=30)
        data = answer.json()
    except (httpx.HTTPError, ValueError):
        console.print(f"[red]Could not reach {network}.[/red] Is the network up at that address?")
        raise typer.Exit(1) from None
    if answer.status_code != 200:
        console.print(f"[red]Refused ({answer.status_code}):[/red] {data.get('error', {}).get('message')}")
        raise typer.Exit(1)
    table = Table("node", "model", "accelerator", "live")
    for n in data["nodes"]:
        table.add_row(n["node_id"], n["model_id"], n["accelerator_type"], "yes" if n["live"] else "no")
    console.print(table)
    r = data["rewards"]
    if r is None:
        console.print("This network runs no settlement.")
    else:
        console.print(
            f"Earned through epoch {r['last_committed_epoch']}: {int(r['cumulative_wei']) / 1e18:.6f} "
            f"({r['cumulative_wei']} wei), claimable from contract {r['contract']} on chain {r['chain_id']} "
            f"with `meritnet settlement claim --network {network} --operator-key-file YOUR_KEY_FILE`."
        )

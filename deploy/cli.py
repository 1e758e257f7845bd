"""The `meritnet` command: the user's entry point to a network.

meritnet up                 start a local network in the foreground (Ctrl-C stops it)
meritnet status             nodes, liveness and load of the running network
meritnet models build       build the default model(s) into the cache
meritnet node ...           run a node of your own and join a network with it (deploy/node_cli.py)
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from deploy.bench_cli import bench
from deploy.node_cli import node_app

app = typer.Typer(help="meritnet: a decentralized inference network on Ray.", no_args_is_help=True)
models_app = typer.Typer(help="Build and inspect local models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(node_app, name="node")
app.command()(bench)
console = Console()


def _mount_optional_subcommands() -> None:
    """Packages that bring their own typer app are mounted here (settlement, scoring)."""
    try:
        from settlement.cli import app as settlement_app
    except ImportError:
        return
    app.add_typer(settlement_app, name="settlement", help="Epochs, Merkle trees, proofs and claims.")
    from settlement.receipts import app as receipt_app

    app.add_typer(receipt_app, name="receipt", help="Check your own request's receipt on-chain.")


_mount_optional_subcommands()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"meritnet {version('meritnet')}")
        raise typer.Exit()


@app.callback()
def main(
    _version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """meritnet: a decentralized inference network on Ray."""


@app.command()
def up(
    config: Path | None = typer.Option(None, "--config", "-c", help="Network YAML (defaults are embedded)."),
    port: int | None = typer.Option(None, help="Port of the OpenAI endpoint (default 8000)."),
    open_endpoint: bool = typer.Option(
        False, "--open", help="Serve a non-loopback host without API keys (anyone who can reach it)."
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Deploy onto this running Ray cluster ('auto' or HOST:PORT; run on its head node) "
        "instead of starting a local one. Ctrl-C removes the network, not the cluster.",
    ),
    start_timeout: float | None = typer.Option(
        None,
        "--start-timeout",
        help="Seconds to wait for every node's engine to load (default 900; start_timeout_s in the YAML).",
    ),
    chain: str | None = typer.Option(
        None,
        "--chain",
        help="Settle on 'embedded' (default: in-process py-evm), 'anvil' (a local anvil node the network "
        "starts, so `meritnet settlement verify --url` can audit it) or a JSON-RPC URL.",
    ),
) -> None:
    """Start a meritnet (vLLM nodes, gateway, control plane) and serve until Ctrl-C: on a local Ray
    cluster of its own, or on yours with --address."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from deploy.config import NetworkConfig
    from deploy.errors import NetworkStartError
    from deploy.network import LocalNetwork

    try:
        cfg = NetworkConfig.load(
            config,
            port=port,
            open_endpoint=open_endpoint or None,
            ray_address=address,
            chain_url=chain,
            start_timeout_s=start_timeout,
        )
    except Exception as exc:  # noqa: BLE001 - YAML, validation or I/O: all get the same message
        console.print(f"[red]Invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from None

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as bar:
        task = {"id": None}

        def step(msg: str) -> None:
            if task["id"] is not None:
                bar.update(task["id"], completed=1, total=1)
            task["id"] = bar.add_task(msg, total=None)

        net = LocalNetwork(cfg, on_step=step)
        try:
            net.start()
            bar.update(task["id"], completed=1, total=1)
        except NetworkStartError as exc:
            console.print(f"[red]Could not start the network:[/red] {exc}")
            net.stop()
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("Interrupted; shutting down.")
            net.stop()
            raise typer.Exit(130) from None

    _print_ready(net)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    shown = 0  # the settlement clock settles due epochs; this shows what it settled
    while not stop.wait(5.0):
        if net.clock is None:
            continue
        try:
            import ray

            settled = ray.get(net.clock.settled.remote(shown), timeout=30)
        except Exception as exc:  # noqa: BLE001 - a slow or restarting clock only delays the message
            console.print(f"[yellow]settlement clock did not answer ({type(exc).__name__})[/yellow]")
            continue
        shown += len(settled)
        for epoch in settled:
            console.print(f"settled epoch {epoch} on-chain")
    with console.status("Shutting down (nodes, gateway, Ray)..."):
        net.stop()
    console.print("Stopped.")


def _print_ready(net) -> None:
    table = Table(title="meritnet is up", show_lines=False)
    for col in ("node", "model", "accelerator", "operator"):
        table.add_column(col)
    for s in net.specs:
        table.add_row(s.node_id, s.model_id, s.accelerator_type, s.operator)
    console.print(table)
    console.print(f"OpenAI endpoint: [bold]{net.base_url}/v1[/bold]   metrics: {net.base_url}/metrics")
    console.print("Try it:")
    console.print(
        f"  curl {net.base_url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "default", "messages": [{"role": "user", "content": "Hello!"}], '
        '"max_tokens": 32}\'',
        soft_wrap=True,
        highlight=False,
    )
    if net.settlement is not None:
        import ray

        st = ray.get(net.settlement.status.remote())
        chain = net.anvil.url if net.anvil else net.config.chain_url
        console.print(
            f"Settlement: contract {st['contract']} on the {chain} chain, "
            f"epochs of {net.config.epoch_length_s:.0f}s (see `meritnet settlement status`).",
            soft_wrap=True,
            highlight=False,
        )
        if net.anvil:
            console.print(
                f"Audit and claim on it with: --url {net.anvil.url} --contract {st['contract']}",
                soft_wrap=True,
                highlight=False,
            )
    _print_validators(net)
    console.print("Press Ctrl-C to stop.")


def _print_validators(net) -> None:
    """Each validator's address (its dividends are paid there) and how it claims: a generated key has
    no gas on a real chain until its address is funded."""
    if not net.config.validators:
        return
    from deploy.scoring import validator_keys
    from deploy.usage import VALIDATOR_KEYS_DIR

    keys = validator_keys(net.config.validators, net.config.state_dir / VALIDATOR_KEYS_DIR)
    for spec in net.config.validators:
        key = keys[spec.validator_id]
        console.print(
            f"Validator {spec.validator_id} signs and is paid as {key.address}: claim its dividends with "
            f"`meritnet settlement claim --network {net.base_url} --operator-key-file {key.path}`"
            + ("" if spec.key_file else " once that address holds gas on the chain"),
            soft_wrap=True,
            highlight=False,
        )


def nodes_table(stats, quality) -> Table:
    """The `status` table: one row per node; quality is the validators' consensus (None: no validators)."""
    table = Table(title="nodes")
    for col in ("node", "model", "accel", "live", "repl", "load", "quality"):  # load = in flight / capacity
        table.add_column(col, no_wrap=True)
    table.add_column("operator", overflow="fold")
    for s in stats:
        if quality is None:
            q = "-"
        elif s.node_id in quality.quality:
            q = f"{quality.quality[s.node_id]:.2f}"
        else:
            q = "unscored"
        table.add_row(
            s.node_id,
            s.model_id,
            s.accelerator_type,
            "yes" if s.live else "no",
            str(s.running_replicas),
            f"{s.in_flight} / {s.capacity}",
            q,
            s.operator,
        )
    return table


@app.command()
def status(
    address: str | None = typer.Option(
        None, help="Ray address of the network (default: the one `meritnet up` recorded in the state folder)."
    ),
    state_dir: Path = typer.Option(
        Path(".meritnet"), help="The network's state folder (holds its Ray token)."
    ),
) -> None:
    """Show the network's nodes: liveness, load, and the validators' consensus quality."""
    import ray

    from cluster.local import AUTH_TOKEN_FILE, RAY_ADDRESS_FILE, use_auth_token

    recorded = state_dir / RAY_ADDRESS_FILE
    address = address or (recorded.read_text().strip() if recorded.is_file() else "auto")
    token = state_dir / AUTH_TOKEN_FILE
    if token.is_file() and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        use_auth_token(token)  # the network's cluster admits only holders of its token

    from cluster.registry import get_registry
    from deploy.scoring import CONSENSUS_NAME, NAMESPACE

    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, ignore_reinit_error=True)
        stats = ray.get(get_registry().snapshot.remote())
    except Exception as exc:  # noqa: BLE001 - no cluster, no registry: the same advice
        console.print(
            f"[red]No running network found ({type(exc).__name__}).[/red] Start one with `meritnet up`."
        )
        raise typer.Exit(1) from None
    try:
        quality = ray.get(ray.get_actor(CONSENSUS_NAME, namespace=NAMESPACE).latest.remote(), timeout=10)
        if quality is None:
            from cluster.records import QualityScores

            quality = QualityScores(epoch=0, quality={})  # validators run; no consensus round yet
    except ValueError:
        quality = None  # no validators in this network
    console.print(nodes_table(stats, quality))


keys_app = typer.Typer(help="Client API keys: stored hashed, with per-key limits.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
StateDirOption = typer.Option(Path(".meritnet"), "--state-dir", help="The network's state folder.")


def _key_store(state_dir: Path):
    from routing.keys import KEYS_FILE, KeyStore

    return KeyStore(state_dir / KEYS_FILE)


@keys_app.command("create")
def keys_create(
    rpm: float | None = typer.Option(None, "--rpm", help="Requests per minute (default: no limit)."),
    tpm: float | None = typer.Option(None, "--tpm", help="Tokens per minute (default: no limit)."),
    model: list[str] | None = typer.Option(None, "--model", help="Allowed model (repeat; default: all)."),
    budget_tokens: int | None = typer.Option(
        None, "--budget-tokens", min=1, help="Tokens it may spend per budget period (default: no budget)."
    ),
    budget_period: str = typer.Option(
        "month", "--budget-period", help="day, week (from Monday) or month, UTC."
    ),
    state_dir: Path = StateDirOption,
) -> None:
    """Create a key; its secret is shown this once (only its hash is stored)."""
    from routing.budgets import PERIODS

    if budget_period not in PERIODS:
        raise typer.BadParameter(f"choose one of {', '.join(PERIODS)}", param_hint="--budget-period")
    key, secret = _key_store(state_dir).create(
        rpm, tpm, tuple(model) if model else None, budget_tokens, budget_period
    )
    budget = f"{budget_tokens} tokens/{budget_period}" if budget_tokens else "-"
    console.print(
        f"key id [bold]{key.key_id}[/bold] (requests/min {rpm or '-'}, tokens/min {tpm or '-'}, "
        f"budget {budget}, models {', '.join(key.models) if key.models else 'all'})"
    )
    console.print("secret (shown once; send it as 'Authorization: Bearer <secret>'):")
    print(secret)


@keys_app.command("revoke")
def keys_revoke(key_id: str, state_dir: Path = StateDirOption) -> None:
    """Revoke a key: the gateway refuses it within a second."""
    try:
        _key_store(state_dir).revoke(key_id)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(1) from None
    console.print(f"revoked {key_id}")


@keys_app.command("list")
def keys_list(state_dir: Path = StateDirOption) -> None:
    """The keys (ids, limits, budgets and what each spent of its budget; never the secrets)."""
    import time

    from routing.budgets import window
    from settlement import UsageLedger

    ledger_path = state_dir / "usage.db"
    settings = UsageLedger.stored_settings(ledger_path) if ledger_path.is_file() else None
    ledger = UsageLedger(ledger_path, *settings) if settings else None
    table = Table("key id", "requests/min", "tokens/min", "budget", "spent", "models", "state")
    for k in _key_store(state_dir).load():
        spent = "-"
        if k.budget_tokens is not None:
            spent = str(ledger.key_spent(k.key_id, window(k.budget_period, time.time())[0]) if ledger else 0)
        table.add_row(
            k.key_id,
            f"{k.requests_per_min or '-'}",
            f"{k.tokens_per_min or '-'}",
            f"{k.budget_tokens}/{k.budget_period}" if k.budget_tokens else "-",
            spent,
            ", ".join(k.models) if k.models else "all",
            "revoked" if k.revoked else "active",
        )
    if ledger is not None:
        ledger.close()
    console.print(table)


@models_app.command("build")
def models_build(seeds: list[int] = typer.Option([0, 1], "--seed", help="Seeds to build.")) -> None:
    """Build the default model for each seed into the cache (reused afterwards)."""
    from cluster.model import build_default_model

    for seed in seeds:
        with console.status(f"Building default model, seed {seed}..."):
            path = build_default_model(seed=seed)
        console.print(f"seed {seed}: {path}")


if __name__ == "__main__":
    app()

"""A network deployed onto a Ray cluster meritnet did not start (issue 14): a head and a GPU-less
"L4" worker started with `ray start` under token authentication.

- `meritnet up --address`, as a user runs it: the node's engine lands on the worker that advertises its
  accelerator, the control plane and the gateway on the head; the endpoint serves the official client;
  Ctrl-C removes the network's applications and actors and leaves the cluster running.
- `deploy/serve.yaml` through Serve's own config path (the controller builds the applications, as
  `serve deploy` and KubeRay do): the network serves with no meritnet driver attached, and its
  settlement clock settles the epoch of that traffic."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.meritnet_up import stop_meritnet_up
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
OPERATOR = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"

# Run inside the cluster (a driver of its own): where each named actor lives, and Serve's apps.
WHERE = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False)
kinds = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
def kind(node_id):
    res = kinds[node_id]
    return "head" if "node:__internal_head__" in res else ",".join(sorted(k for k in res if k.startswith("accel_")))
placed = {}
for a in ray.util.list_named_actors(all_namespaces=True):
    handle = ray.get_actor(a["name"], namespace=a["namespace"])
    node = ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)
    placed[a["namespace"] + "/" + a["name"]] = kind(node)
try:
    apps = sorted(serve.status().applications)
except Exception:  # Serve is not running (the network stopped it with its last app)
    apps = []
print(json.dumps({"placed": placed, "apps": apps, "nodes": len(kinds)}))
"""


def _ray(args: list[str], env: dict) -> None:
    subprocess.run([str(VENV_BIN / "ray"), *args], env=env, check=True, capture_output=True, timeout=180)


def _where(address: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WHERE, address],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kill_cluster(temp_dir: Path, token: Path) -> None:
    """Stop the processes of this cluster only (`ray stop` would stop every cluster on the machine): Ray's,
    named by its temp dir, and what they started outside it (Serve's HAProxy), named by its token path."""
    marks = (str(temp_dir).encode(), f"RAY_AUTH_TOKEN_PATH={token}".encode())
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (
                marks[0] in (proc / "cmdline").read_bytes() or marks[1] in (proc / "environ").read_bytes()
            ):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-node Ray cluster on 127.0.0.1, started the way an operator starts one."""
    home = tmp_path_factory.mktemp("existing")
    temp_dir = Path(f"/tmp/mn-{secrets.token_hex(3)}")  # short: Ray's socket paths must stay < 108 bytes
    token = home / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{free_port()}"
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        _ray(
            ["start", "--head", f"--port={address.split(':')[1]}", f"--temp-dir={temp_dir}", "--num-cpus=4",
             "--include-dashboard=false", *common],
            env,
        )  # fmt: skip
        _ray(["start", f"--address={address}", "--num-cpus=4", '--resources={"accel_L4": 1}', *common], env)
        yield address, env, home
    finally:
        _kill_cluster(temp_dir, token)


def _network_yaml(home: Path, name: str, **extra) -> tuple[Path, int]:
    port = free_port()
    config = home / f"{name}.yaml"
    node = {"node_id": "l4-a", "operator": OPERATOR, "accelerator_type": "L4"}
    body = {"port": port, "state_dir": str(home / f"{name}-state"), "nodes": [node], **extra}
    config.write_text(yaml.safe_dump(body))
    return config, port


def _wait_serving(port: int, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 900  # a vLLM engine start on a loaded 2-core machine
    while (proc is None or proc.poll() is None) and time.monotonic() < deadline:
        try:
            if "default" in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).text:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"the network did not serve on {port} (exit {proc.poll() if proc else None})")


def test_meritnet_up_deploys_onto_a_cluster_it_did_not_start(cluster):
    from openai import OpenAI

    address, env, home = cluster
    config, port = _network_yaml(home, "up")
    up = subprocess.Popen(
        [str(VENV_BIN / "meritnet"), "up", "--address", address, "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_serving(port, up)

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        raw = client.completions.with_raw_response.create(model="default", prompt="Hello", max_tokens=4)
        assert raw.headers["x-meritnet-node"] == "l4-a" and raw.parse().usage.completion_tokens == 4

        where = _where(address, env)
        control = {k: v for k, v in where["placed"].items() if k.startswith("meritnet/")}
        assert {"meritnet/meritnet-registry", "meritnet/meritnet-usage"} <= set(control), where
        assert set(control.values()) == {"head"}, where
        serve = {k: v for k, v in where["placed"].items() if k.startswith("serve/SERVE_REPLICA")}
        assert {v for k, v in serve.items() if "node-l4-a" in k} == {"accel_L4"}, where
        assert {v for k, v in serve.items() if "#gateway#" in k} == {"head"}, where
    finally:
        out = stop_meritnet_up(up)
    assert up.returncode == 0, out[-3000:]

    after = _where(address, env)  # the network is gone; the cluster is not
    assert after["nodes"] == 2
    assert not [k for k in after["placed"] if k.startswith("meritnet/")], after
    assert not {"meritnet", "node-l4-a"} & set(after["apps"]), after


def test_the_serve_config_runs_the_network_with_no_driver_attached(cluster):
    from openai import OpenAI

    from settlement import UsageLedger

    address, env, home = cluster
    config, port = _network_yaml(home, "served", epoch_length_s=10)
    serve_config = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "serve.yaml").read_text())
    serve_config["http_options"]["port"] = port
    gateway, node_app = serve_config["applications"][:2]
    gateway["args"]["config"] = node_app["args"]["config"] = str(config)
    node_app.update(name="node-l4-a", args={"config": str(config), "node_id": "l4-a"})
    serve_config["applications"] = [gateway, node_app]
    (home / "serve-config.yaml").write_text(yaml.safe_dump(serve_config))

    serve = [
        str(VENV_BIN / "serve"),
        "run",
        str(home / "serve-config.yaml"),
        "--non-blocking",
        "--address",
        address,
    ]
    subprocess.run(serve, env=env, check=True, capture_output=True, timeout=300)  # returns once submitted
    _wait_serving(port)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.completions.with_raw_response.create(model="default", prompt="Hello", max_tokens=4)
    assert raw.headers["x-meritnet-node"] == "l4-a"

    state = json.loads((home / "served-state" / "state.json").read_text())
    ledger = UsageLedger(home / "served-state" / "usage.db", 10, genesis=state["genesis"])
    epoch = ledger.epoch_of(time.time())
    deadline = time.monotonic() + 180  # the epoch ends, then the clock's next beat settles it
    while ledger.settled(epoch) is None and time.monotonic() < deadline:
        time.sleep(2)
    assert ledger.settled(epoch), f"epoch {epoch} was not settled with no driver attached"
    placed = _where(address, env)["placed"]
    assert placed.get("meritnet/meritnet-settlement-clock") == "head", placed

"""How fast the network heals when a node's engine dies (issue 25).

    python -m benchmarks.heal --out heal.json [--observe-s 240]

Starts the demo network (two vLLM nodes), sends one short completion after another from one client,
then SIGKILLs node l4-b's vLLM engine-core process (as a native crash or an OOM kill would) and records:
  unlive_s     seconds until the registry (`meritnet status`, `/status`) no longer lists l4-b as live
  healed_s     seconds until the first of the client's requests after which none failed
  failed       client requests that failed after the kill (each is a 503 or an error)
  back_live_s  seconds until the replacement replica is live in the registry
  back_serves_s seconds until a request pinned to l4-b is served by the replacement
The figures go to `--out` as JSON with the machine (CPU model and ISA flags: the CPU build's kernels
differ by ISA).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

from benchmarks.machine import machine

console = Console(stderr=True)
VICTIM = "l4-b"


class Client:
    """One client sending short completions back to back; each outcome (monotonic time, status) kept.
    Bounded: it stops by itself after `max_s`."""

    def __init__(self, base_url: str, max_s: float = 1800.0) -> None:
        self.outcomes: list[tuple[float, int]] = []
        self._deadline = time.monotonic() + max_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url,), daemon=True)
        self._thread.start()

    def _run(self, base_url: str) -> None:
        body = {"model": "default", "prompt": "steady", "max_tokens": 4}
        with httpx.Client(base_url=base_url, timeout=120) as http:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    status = http.post("/v1/completions", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                self.outcomes.append((time.monotonic(), status))

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(timeout=180)
        return list(self.outcomes)


def kill_engine_core(node_id: str):
    """SIGKILL node `node_id`'s vLLM engine-core process (its replica lives on); the killed process."""
    from ray.util.state import list_actors

    from cluster.engine_watch import engine_processes
    from cluster.local import state_address

    app = f"node-{node_id}"
    (replica,) = list_actors(
        address=state_address(),
        filters=[("class_name", "=", f"ServeReplica:{app}:{app}"), ("state", "=", "ALIVE")],
        detail=True,
    )
    core = next(p for p, name in engine_processes(replica.pid) if name == "VLLM::EngineCore")
    core.kill()
    return core


def healed_since(outcomes: list[tuple[float, int]], since: float) -> list[tuple[float, int]]:
    """The outcomes after `since` (as seconds after it) from the first after which no request failed."""
    after = [(t - since, s) for t, s in outcomes if t > since]
    last_bad = max((i for i, (_, s) in enumerate(after) if s != 200), default=-1)
    return after[last_bad + 1 :]


def _live(registry, node_id: str) -> bool:
    import ray

    return any(s.node_id == node_id and s.live for s in ray.get(registry.snapshot.remote()))


def _until(condition, since: float, timeout_s: float, every_s: float = 0.25) -> float | None:
    """Seconds from `since` (a monotonic time) until `condition()` held, or None if it did not within
    `timeout_s` from now."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic() - since
        time.sleep(every_s)
    return None


def run(observe_s: float) -> dict:
    from cluster.registry import get_registry
    from deploy.config import NetworkConfig
    from deploy.network import LocalNetwork

    with tempfile.TemporaryDirectory() as state:
        cfg = NetworkConfig(port=9500 + os.getpid() % 400, state_dir=Path(state))
        with console.status("starting the network (two vLLM engines)"):
            net = LocalNetwork(cfg, on_step=lambda m: console.log(m)).start()
        try:
            registry = get_registry()
            client = Client(net.base_url)
            time.sleep(10)  # traffic before the kill
            core = kill_engine_core(VICTIM)
            killed = time.monotonic()
            console.log(f"killed {VICTIM}'s engine core (pid {core.pid})")
            unlive = _until(lambda: not _live(registry, VICTIM), killed, 120)
            console.log(f"{VICTIM} out of the registry after {unlive} s")
            back_live = _until(lambda: _live(registry, VICTIM), killed, 900, every_s=1.0)
            console.log(f"{VICTIM} live again after {back_live} s")
            headers = {"x-meritnet-node": VICTIM, "x-meritnet-challenge-key": net.challenge_key}
            body = {"model": "default", "prompt": "back?", "max_tokens": 2}

            def served() -> bool:
                try:
                    r = httpx.post(f"{net.base_url}/v1/completions", json=body, headers=headers, timeout=60)
                except httpx.HTTPError:
                    return False
                return r.status_code == 200

            back_serves = _until(served, killed, 300, every_s=1.0)
            time.sleep(max(0.0, killed + observe_s - time.monotonic()))
            outcomes = client.stop()
        finally:
            net.stop()
    after = [s for t, s in outcomes if t > killed]
    healed = healed_since(outcomes, killed)
    return {
        "machine": machine(),
        "victim": VICTIM,
        "requests_after_kill": len(after),
        "failed": sum(s != 200 for s in after),
        "unlive_s": unlive,
        "healed_s": healed[0][0] if healed else None,
        "requests_ok_after_heal": len(healed),
        "back_live_s": back_live,
        "back_serves_s": back_serves,
        "observe_s": observe_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="Where to write the JSON result.")
    parser.add_argument(
        "--observe-s", type=float, default=240.0, help="Traffic kept up this long after the kill."
    )
    args = parser.parse_args()
    result = run(args.observe_s)
    args.out.write_text(json.dumps(result, indent=2))
    console.print_json(json.dumps(result))


if __name__ == "__main__":
    main()

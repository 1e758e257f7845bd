"""Start and stop a local anvil node (the real EVM node the settlement tests run against).

anvil comes from the npm package `@foundry-rs/anvil` that `make setup` installs under .tools/. It is
bound to 127.0.0.1 on a free port; `state_file` makes it load its state at start and dump it at
exit, so a test can stop the chain mid-run and bring the same chain back. `meritnet up --chain anvil`
runs one for the network (deploy/localchain.py), its output in `log_file` (a pipe nobody reads would
fill up and stall a node that runs for days).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import httpx

ANVIL_ENV = "MERITNET_ANVIL"
_REPO_ANVIL = Path(__file__).resolve().parents[1] / ".tools" / "node_modules" / ".bin" / "anvil"


def anvil_binary() -> str:
    """$MERITNET_ANVIL, else the repo's .tools copy, else `anvil` on PATH."""
    for candidate in (os.environ.get(ANVIL_ENV), str(_REPO_ANVIL), shutil.which("anvil")):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError(
        f"anvil not found: run `make setup` (installs {_REPO_ANVIL}) or set ${ANVIL_ENV} to its path"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Anvil:
    """One anvil process. Use as a context manager, or call stop()."""

    def __init__(
        self,
        port: int | None = None,
        state_file: Path | None = None,
        block_time: float | None = None,
        log_file: Path | None = None,
    ):
        self.port = port or free_port()
        self.state_file = state_file
        self.block_time = block_time
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Anvil:
        cmd = [anvil_binary(), "--host", "127.0.0.1", "--port", str(self.port), "--silent"]
        if self.state_file is not None:
            cmd += ["--state", str(self.state_file)]
        if self.block_time is not None:
            cmd += ["--block-time", str(self.block_time)]
        if self.log_file is not None:
            with self.log_file.open("ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        else:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.proc.stderr:
                    err = self.proc.stderr.read().decode(errors="replace")
                else:
                    err = self.log_file.read_text(errors="replace")
                raise RuntimeError(f"anvil exited at start (code {self.proc.returncode}): {err[-500:]}")
            if self.rpc("eth_chainId", raise_errors=False) is not None:
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"anvil did not answer on {self.url} within {timeout_s}s")

    def rpc(self, method: str, params: list | None = None, raise_errors: bool = True):
        """One raw JSON-RPC call (for anvil_* / evm_* methods web3 does not wrap)."""
        try:
            reply = httpx.post(
                self.url,
                json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []},
                timeout=5,
            ).json()
        except httpx.HTTPError:
            if raise_errors:
                raise
            return None
        if "error" in reply and raise_errors:
            raise RuntimeError(f"anvil {method} failed: {reply['error']}")
        return reply.get("result")

    def stop(self) -> None:
        """Stop gracefully (SIGINT), so a --state file is dumped before exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

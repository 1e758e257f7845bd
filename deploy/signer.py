"""The control plane's signing keys, held by a process outside the Ray cluster.

Code in any Ray worker can look up a named actor and, with `__ray_call__`, run a function inside it:
a key held by an actor is a key every process of the cluster can take, managed vLLM engines and the
model code they load included. So `meritnet up` starts this signer before Ray, as a child of the CLI
(no Ray process starts it or can enter it), and the settlement actor and validators hold a
`RemoteSigner` instead: a socket path and a key name, no secret. The signer signs only what those
actors sign anyway, each request checked field by field (`SigningPolicy`):

- `settler`: a type-2 transaction with no value, on the chain of its first signature, within the gas
  limits and the fee cap, that deploys the distributor (its exact bytecode) or calls it: `settle` at an
  epoch no lower than the last it signed (the same epoch again only with the same calldata: a re-sign
  at a new nonce or fee), or `set_stake` on a distributor it deployed itself, before its first settle
  (the settler is the admin of a local network only);
- a validator's id: an EIP-712 score report (`scoring.report`'s domain and types) naming that validator.

Anything else is refused with the reason and nothing of the payload is logged. A process inside the
cluster can still ask for what the settler would sign anyway, which the contract caps per epoch and the
admin can veto within its claim delay. It cannot take a key, move the settler's ether, sign on another
chain or for another contract, or sign as another validator.

The socket sits in a folder only its owner may enter (0700). On one machine and one Unix user (the
demo), the key files themselves stay readable by that user's processes: a real network runs the signer
as its own user (its key files or keystore passphrase readable by it alone) and gives the Ray user the
socket's group. Keep it on the head node, where the settlement actor and the validators run.

    python -m deploy.signer --socket PATH --key settler=FILE [--key VALIDATOR_ID=FILE ...]
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from settlement.chain_settings import DEPLOY_GAS

log = logging.getLogger("meritnet.signer")

SETTLER = "settler"  # the settler key's name; any other name is a validator id
MAX_REQUEST_BYTES = 1 << 20  # a deploy's initcode is the largest request (~30 KB of hex)
MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path (sun_path holds 108, with its NUL)
CALL_GAS_LIMIT = 200_000  # settle and set_stake (ChainSettings.settle_gas_limit's default)


class SignRefused(ValueError):
    """A request the policy does not sign; the message says why (never the payload)."""


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    op: Literal["address", "transaction", "typed_data"]
    key: str = Field(min_length=1, max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)


class Signed(NamedTuple):
    """What `RemoteSigner.sign_typed_data` gives back: eth-account's SignedMessage has the same field."""

    signature: bytes


@dataclass
class SigningPolicy:
    """What the settler and validator keys may sign; state is what the settler signed so far."""

    max_fee_wei: int = 500 * 10**9  # ChainSettings.max_fee_cap_wei's default
    settle_gas_limit: int = CALL_GAS_LIMIT
    contract: str | None = None  # the distributor, when known at start (else: the one it deploys)
    chain_id: int | None = None
    _deployed: bool = False
    _settles: dict[int, str] = field(default_factory=dict)  # epoch -> calldata signed for it
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check_transaction(self, key: str, address: str, tx: Mapping[str, Any]) -> dict[str, Any]:
        """The transaction to sign, or SignRefused."""
        if key != SETTLER:
            raise SignRefused(f"key {key!r} signs score reports only")
        from settlement.compile import load_artifact

        tx = dict(tx)
        if tx.get("type") != 2 or "gasPrice" in tx:
            raise SignRefused("only type-2 (EIP-1559) transactions are signed")
        if tx.get("value", 0) != 0:
            raise SignRefused("the settler moves no ether")
        if tx.get("from", address).lower() != address.lower():
            raise SignRefused("the transaction is from another account")
        if not isinstance(tx.get("chainId"), int):
            raise SignRefused("a transaction without a chain id")
        if not isinstance(tx.get("maxFeePerGas"), int) or tx["maxFeePerGas"] > self.max_fee_wei:
            raise SignRefused(f"max fee above the cap of {self.max_fee_wei} wei")
        artifact = load_artifact()
        data = str(tx.get("data", ""))
        with self._lock:
            if self.chain_id is not None and tx.get("chainId") != self.chain_id:
                raise SignRefused(f"not chain {self.chain_id}, the one this signer signs for")
            if tx.get("to") in (None, "", "0x"):  # a contract creation
                tx.pop("to", None)
                self._check_deploy(tx, data, artifact["bytecode"])
            else:
                self._check_call(tx, data, artifact["abi"])
            self.chain_id = tx.get("chainId")
        return tx

    def _check_deploy(self, tx: Mapping[str, Any], data: str, bytecode: str) -> None:
        from web3.utils.address import get_create_address

        if self.contract is not None:
            raise SignRefused("the distributor is deployed already; no other contract is")
        gas = tx.get("gas")
        if not data.lower().startswith(bytecode.lower()) or not isinstance(gas, int) or gas > DEPLOY_GAS:
            raise SignRefused("a contract creation that is not the distributor's")
        self.contract = get_create_address(tx["from"], int(tx["nonce"]))  # the only contract it calls
        self._deployed = True

    def _check_call(self, tx: Mapping[str, Any], data: str, abi: list) -> None:
        from web3 import Web3

        if Web3.to_checksum_address(tx["to"]) != self.contract:
            raise SignRefused("a call to a contract that is not the network's distributor")
        if not isinstance(tx.get("gas"), int) or tx["gas"] > max(self.settle_gas_limit, CALL_GAS_LIMIT):
            raise SignRefused("gas limit above the settle limit")
        try:
            fn, args = Web3().eth.contract(abi=abi).decode_function_input(data)
        except ValueError:
            raise SignRefused("calldata that is no distributor function") from None
        if fn.fn_name == "set_stake":
            if not self._deployed or self._settles:
                raise SignRefused("stakes are set only right after this signer deployed the distributor")
        elif fn.fn_name == "settle":
            epoch = int(args["epoch"])
            if self._settles and epoch < max(self._settles):
                raise SignRefused(f"epoch {epoch} is below the last one signed ({max(self._settles)})")
            if self._settles.get(epoch, data) != data:
                raise SignRefused(f"epoch {epoch} was signed with other roots")
            self._settles[epoch] = data
        else:
            raise SignRefused(f"the settler does not call {fn.fn_name}")

    def check_typed_data(self, key: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """The EIP-712 message to sign: a score report of validator `key`, or SignRefused."""
        from scoring.report import ScoreReport, typed_data

        if key == SETTLER:
            raise SignRefused("the settler key signs transactions only")
        expected = typed_data(ScoreReport(validator=key, round=0, issued_at_ms=0))
        body = message.get("message") or {}
        shape = {k: message.get(k) for k in ("types", "primaryType", "domain")}
        if shape != {k: expected[k] for k in shape} or body.get("validator") != key:
            raise SignRefused(f"not a score report of validator {key!r}")
        if set(body) != set(expected["message"]):
            raise SignRefused("a score report with other fields")
        return {**expected, "message": dict(body)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RemoteSigner:
    """What the settlement actor and a validator hold instead of a key: a signer's socket and a key
    name. Picklable (nothing secret in it); `address`, `sign_transaction` and `sign_typed_data` answer
    as `settlement.keys.SettlerKey` does."""

    __slots__ = ("address", "key", "socket_path")

    def __init__(self, socket_path: str | Path, key: str) -> None:
        self.socket_path, self.key = str(socket_path), key
        self.address = self._call("address")["address"]

    def _call(self, op: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        line = json.dumps({"op": op, "key": self.key, "payload": _jsonable(payload or {})}) + "\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(self.socket_path)
                s.sendall(line.encode())
                answer = json.loads(s.makefile("rb").readline(MAX_REQUEST_BYTES))
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"the signer at {self.socket_path} did not answer ({type(exc).__name__}); is `meritnet up` "
                "(which runs it) still running?"
            ) from None
        if "error" in answer:
            raise SignRefused(f"the signer refused: {answer['error']}")
        return answer

    def sign_transaction(self, tx: Mapping[str, Any]) -> bytes:
        return bytes.fromhex(self._call("transaction", tx)["raw"][2:])

    def sign_typed_data(self, full_message: Mapping[str, Any]) -> Signed:
        return Signed(bytes.fromhex(self._call("typed_data", full_message)["signature"][2:]))

    def __repr__(self) -> str:
        return f"RemoteSigner({self.key}={self.address} via {self.socket_path})"


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 10  # a caller that connects and sends nothing does not hold a thread

    def handle(self) -> None:
        try:
            answer = self.server.answer(self.rfile.readline(MAX_REQUEST_BYTES + 1))
        except SignRefused as exc:
            log.warning("refused a signing request: %s", exc)
            answer = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - nothing a caller sends stops the signer
            log.warning("a signing request failed (%s)", type(exc).__name__)
            answer = {"error": f"the request failed ({type(exc).__name__})"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, keys: Mapping[str, Any], policy: SigningPolicy) -> None:
        self.keys, self.policy = dict(keys), policy
        super().__init__(path, _Handler)

    def answer(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_REQUEST_BYTES:
            raise SignRefused("request too large")
        try:
            request = _Request.model_validate_json(raw)
        except ValidationError:
            raise SignRefused("not a signing request") from None
        key = self.keys.get(request.key)
        if key is None:
            raise SignRefused(f"no key named {request.key!r}")
        if request.op == "address":
            return {"address": key.address}
        try:
            if request.op == "transaction":
                tx = self.policy.check_transaction(request.key, key.address, request.payload)
                return {"raw": "0x" + key.sign_transaction(tx).hex()}
            message = self.policy.check_typed_data(request.key, request.payload)
            return {"signature": "0x" + bytes(key.sign_typed_data(message).signature).hex()}
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SignRefused):
                raise
            raise SignRefused(f"a malformed {request.op} ({type(exc).__name__})") from None


def serve(socket_path: Path, keys: Mapping[str, Any], policy: SigningPolicy) -> None:
    """Answer on `socket_path` (its folder made 0700) until killed."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.parent.chmod(0o700)
    socket_path.unlink(missing_ok=True)
    with _Server(str(socket_path), keys, policy) as server:
        socket_path.chmod(0o600)
        server.serve_forever()


class SignerProcess:
    """`meritnet up`'s signer: started before Ray (a child of the CLI, not of Ray), stopped with the
    network. `chain`: the settler's chain settings (its distributor, fee cap and gas limit)."""

    def __init__(self, socket_path: Path, key_files: Mapping[str, Path], chain: Any = None) -> None:
        self.socket_path = socket_path.absolute()  # the actors' working folder is not this one
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise RuntimeError(
                f"the signer's socket path {self.socket_path} is longer than Unix allows ({MAX_SOCKET_PATH} "
                "bytes): use a shorter state_dir, or run the signer yourself and set signer_socket"
            )
        self.key_files, self.chain = dict(key_files), chain
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> SignerProcess:
        args = [sys.executable, "-m", "deploy.signer", "--socket", str(self.socket_path)]
        args += [a for name, path in self.key_files.items() for a in ("--key", f"{name}={path}")]
        if self.chain is not None:
            args += ["--max-fee-wei", str(self.chain.max_fee_cap_wei)]
            args += ["--settle-gas-limit", str(self.chain.settle_gas_limit)]
            args += ["--contract", self.chain.contract] if self.chain.contract else []
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)  # also when `meritnet up` ends by an unexpected error
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                RemoteSigner(self.socket_path, next(iter(self.key_files)))
                return self
            except RuntimeError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the signer did not start within {timeout_s:.0f} s (its error is printed above)")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def main(argv: list[str] | None = None) -> None:
    from settlement.keys import SettlerKey, SettlerKeyError

    parser = argparse.ArgumentParser(prog="python -m deploy.signer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to answer on")
    parser.add_argument("--key", action="append", default=[], help="NAME=FILE (a key file, chmod 600)")
    parser.add_argument("--contract", help="the distributor, when it is deployed already")
    parser.add_argument("--max-fee-wei", type=int, default=SigningPolicy.max_fee_wei)
    parser.add_argument("--settle-gas-limit", type=int, default=SigningPolicy.settle_gas_limit)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s signer %(levelname)s %(message)s")
    try:
        keys = {
            n: SettlerKey.from_file(Path(p), what=f"{n} key") for n, p in (k.split("=", 1) for k in args.key)
        }
    except (SettlerKeyError, ValueError) as exc:
        sys.exit(f"signer: {exc}")
    if not keys:
        sys.exit("signer: give at least one key: --key settler=FILE or --key VALIDATOR_ID=FILE")
    os.umask(0o077)
    policy = SigningPolicy(
        max_fee_wei=args.max_fee_wei, settle_gas_limit=args.settle_gas_limit, contract=args.contract
    )
    serve(args.socket, keys, policy)


if __name__ == "__main__":
    main()

"""Chain access for settlement: the distributor contract over web3 (v8), signed with eth-account.

Three backends, one client: the embedded chain (py-evm through eth-tester, in this process; the
default, for `make demo`), anvil (started by `Anvil.start()` on 127.0.0.1 for tests) and any JSON-RPC
URL. Every transaction is signed locally and sent raw, so the exact bytes can be written ahead and
rebroadcast after a crash. Reads and writes are thin; the decisions live in settlement.settler and
settlement.settle_tx.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address
from web3 import Web3
from web3.exceptions import ContractCustomError, TimeExhausted, TransactionNotFound, Web3RPCError

from settlement.chain_settings import DEPLOY_GAS, EMBEDDED, ChainSettings, redact_url
from settlement.compile import load_artifact
from settlement.fees import Fees
from settlement.keys import Signer


class ChainUnavailable(RuntimeError):
    """The node did not answer; settlement queues and retries (never a reason to drop an epoch)."""


class ContractReverted(RuntimeError):
    """The contract rejected a call; `error` is the custom error's name (e.g. 'EpochOutOfOrder')."""

    def __init__(self, error: str, args: tuple = ()) -> None:
        super().__init__(f"contract reverted with {error}{args}")
        self.error = error
        self.error_args = args


@dataclass(frozen=True)
class RootWindow:
    """The distributor's reward roots as a claim sent now would see them (the pending block's clock).

    The latest root (of epoch `latest_epoch`) is pending until `claimable_at`: claims verify against
    the root before it (epoch latest_epoch - 1) and the admin may veto it. claimable_at 0: nothing
    is pending (none posted, or the last one vetoed)."""

    latest_epoch: int
    claimable_at: int
    now: int

    @property
    def pending(self) -> bool:
        return self.now < self.claimable_at

    @property
    def claimable_epoch(self) -> int:
        """The epoch whose cumulative reward root claims verify against now (-1 or below the
        distributor's first epoch: none yet)."""
        return self.latest_epoch - 1 if self.pending else self.latest_epoch


@dataclass(frozen=True)
class TxInfo:
    """What the chain says about a tx hash: 'mined' (with success flag), 'pending' or 'unknown'."""

    state: str
    success: bool = False
    block: int | None = None


class Chain:
    """The distributor contract on one chain."""

    def __init__(self, w3: Web3, settings: ChainSettings | None = None, address: str | None = None) -> None:
        self.w3 = w3
        self.settings = settings or ChainSettings()
        self.artifact = load_artifact()
        self._errors = {
            Web3.keccak(text=f"{e['name']}({','.join(i['type'] for i in e['inputs'])})")[:4]: e
            for e in self.artifact["abi"]
            if e["type"] == "error"
        }
        self.address: str | None = None
        self.contract = None
        self.deploy_block = self.settings.deploy_block  # where the distributor's event history starts
        self._tester = None  # the embedded chain's EthereumTester (see _keep_time)
        if address or self.settings.contract:
            self.at(address or self.settings.contract)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def connect(cls, settings: ChainSettings | None = None) -> Chain:
        settings = settings or ChainSettings()
        if settings.url == EMBEDDED:
            return cls.embedded(settings)
        w3 = Web3(Web3.HTTPProvider(settings.url, request_kwargs={"timeout": 10}))
        return cls(w3, settings)

    @classmethod
    def embedded(cls, settings: ChainSettings | None = None) -> Chain:
        """A fresh in-process py-evm chain (its state ends with the process)."""
        from eth_tester import EthereumTester
        from web3 import EthereumTesterProvider

        chain = cls(Web3(EthereumTesterProvider(EthereumTester())), settings)
        chain._tester = chain.w3.provider.ethereum_tester
        return chain

    def at(self, address: str) -> Chain:
        self.address = to_checksum_address(address)
        self.contract = self.w3.eth.contract(address=self.address, abi=self.artifact["abi"])
        return self

    @property
    def chain_id(self) -> int:
        return self._rpc(lambda: self.w3.eth.chain_id)

    def fund(self, address: str, wei: int) -> None:
        """Send ETH from the node's first unlocked dev account (embedded chain and anvil only)."""
        tx = self._rpc(
            lambda: self.w3.eth.send_transaction(
                {"from": self.w3.eth.accounts[0], "to": to_checksum_address(address), "value": wei}
            )
        )
        self.wait_receipt(tx)

    def deploy(
        self,
        key: Signer,
        first_epoch: int,
        emission_cap: int,
        admin: str | None = None,
        *,
        genesis: int,
        epoch_length: int,
        claim_delay: int = 0,
        name: str = "meritnet reward",
        symbol: str = "MRT",
    ) -> str:
        """Deploy the distributor with `key` as settler (it also pays for the deploy), `admin` as admin
        (default: the settler's own address, fine for a local network; a real one names a multisig),
        at most `emission_cap` wei per settle, and epochs of `epoch_length` whole seconds from
        `genesis` (unix seconds; see cluster.epochs.Epochs.onchain): epoch e settles only once
        the chain's clock has passed its end. Each reward root is pending (vetoable by the admin, not
        claimable) for `claim_delay` seconds; 0, the default here for tests and benchmarks, makes it
        claimable at once (the settler passes SettlementConfig.claim_delay). Returns (and binds to)
        its address."""
        admin = to_checksum_address(admin) if admin else key.address
        factory = self.w3.eth.contract(abi=self.artifact["abi"], bytecode=self.artifact["bytecode"])
        constructor = factory.constructor(
            name, symbol, admin, key.address, first_epoch, emission_cap, genesis, epoch_length, claim_delay
        )
        # Simulated first, so a zero admin comes back as ZeroAddress rather than a failed receipt.
        self._raise_by_name(
            lambda: self.w3.eth.call({"from": key.address, "data": constructor.data_in_transaction})
        )
        tx = constructor.build_transaction(
            self._tx_fields(key.address, self.nonce(key.address), self.fees(), gas=DEPLOY_GAS)
        )
        receipt = self.wait_receipt(self.send_raw(key.sign_transaction(tx)))
        if receipt["status"] != 1:
            raise RuntimeError("deploying the distributor failed (out of gas or no funds on the settler)")
        self.deploy_block = receipt["blockNumber"]
        return self.at(receipt["contractAddress"]).address

    # -- reads ----------------------------------------------------------------------------------

    def has_code(self) -> bool:
        """Whether a contract is deployed at the bound address (a wrong address has none)."""
        return self.address is not None and len(self._rpc(lambda: self.w3.eth.get_code(self.address))) > 0

    def _view(self, name: str, *args: Any) -> Any:
        if self.contract is None:
            raise RuntimeError("no distributor address: set MERITNET_CHAIN_CONTRACT or deploy one first")
        return self._rpc(lambda: getattr(self.contract.functions, name)(*args).call())

    def next_epoch(self) -> int:
        return self._view("next_epoch")

    def usage_root(self, epoch: int) -> bytes:
        return bytes(self._view("usage_root", epoch))

    def reward_root(self) -> bytes:
        """The root a claim sent now verifies against: the latest one once its veto window has
        passed, else the one before it (read at the pending block, whose timestamp is the node's
        clock now: an idle chain's latest block may be older than the window's end)."""
        if self.contract is None:
            raise RuntimeError("no distributor address: set MERITNET_CHAIN_CONTRACT or deploy one first")
        self._keep_time()
        fn = self.contract.functions.reward_root()
        return bytes(self._rpc(lambda: fn.call(block_identifier="pending")))

    def latest_root(self) -> bytes:
        """The last reward root posted (pending until claimable_at, claimable after)."""
        return bytes(self._view("latest_root"))

    def claim_delay(self) -> int:
        return self._view("claim_delay")

    def claimable_at(self) -> int:
        """When the latest reward root becomes claimable (0: none pending since the last veto)."""
        return self._view("claimable_at")

    def root_window(self) -> RootWindow:
        """Which epoch's reward root is claimable now, and whether a later one is pending."""
        self._keep_time()
        latest, until = self.next_epoch() - 1, self.claimable_at()
        now = self._rpc(lambda: self.w3.eth.get_block("pending")["timestamp"])
        return RootWindow(latest, until, now)

    def total_rewarded(self) -> int:
        return self._view("total_rewarded")

    def claimed(self, account: str) -> int:
        return self._view("claimed", to_checksum_address(account))

    def balance_of(self, account: str) -> int:
        return self._view("balanceOf", to_checksum_address(account))

    def total_supply(self) -> int:
        return self._view("totalSupply")

    def settler(self) -> str:
        return self._view("settler")

    def admin(self) -> str:
        return self._view("admin")

    def emission_cap(self) -> int:
        return self._view("emission_cap")

    def paused(self) -> bool:
        return self._view("paused")

    def stake(self, validator: str) -> int:
        """The stake the admin recorded for a validator address (0 if none)."""
        return self._view("stake", to_checksum_address(validator))

    def pending_settler(self) -> str:
        return self._view("pending_settler")

    def epochs(self) -> tuple[int, int]:
        """(genesis, epoch length) the distributor times epochs with, in whole seconds."""
        return self._view("genesis"), self._view("epoch_length")

    def timestamp(self) -> int:
        """The latest block's timestamp: the chain's clock as of its last block (unix seconds)."""
        return self._rpc(lambda: self.w3.eth.get_block("latest")["timestamp"])

    def settled_events(self, epoch: int | None = None) -> list[dict[str, Any]]:
        """EpochSettled logs (all, or one epoch's): the auditable history of roots and totals, read in
        pages of log_chunk_blocks from the deploy block to the latest block. A vetoed epoch has one
        per settle (RootVetoed between them): the last one is the epoch's root if it is settled."""
        return self._events("EpochSettled", epoch)

    def vetoed_events(self, epoch: int | None = None) -> list[dict[str, Any]]:
        """RootVetoed logs (all, or one epoch's): the roots the admin took back."""
        return self._events("RootVetoed", epoch)

    def _events(self, name: str, epoch: int | None) -> list[dict[str, Any]]:
        event = getattr(self.contract.events, name)
        filters = {"epoch": epoch} if epoch is not None else None
        latest = self.block_number()
        chunk = self.settings.log_chunk_blocks
        logs = []
        for start in range(self.deploy_block, latest + 1, chunk):
            end = min(start + chunk - 1, latest)
            logs += self._rpc(
                lambda start=start, end=end: event.get_logs(
                    from_block=start, to_block=end, argument_filters=filters
                )
            )
        return [
            {**dict(log["args"]), "tx_hash": bytes(log["transactionHash"]), "block": log["blockNumber"]}
            for log in logs
        ]

    # -- transactions ---------------------------------------------------------------------------

    def block_number(self) -> int:
        return self._rpc(lambda: self.w3.eth.block_number)

    def nonce(self, address: str, block: str = "pending") -> int:
        return self._rpc(lambda: self.w3.eth.get_transaction_count(to_checksum_address(address), block))

    def fees(self) -> Fees:
        """Market fees now: max fee = 2 x base fee + tip, so the tx survives a few fuller blocks."""

        def read() -> Fees:
            base = self.w3.eth.get_block("latest").get("baseFeePerGas", 0)
            tip = self.w3.eth.max_priority_fee
            return Fees(2 * base + tip, tip)

        return self._rpc(read)

    def _tx_fields(self, sender: str, nonce: int, fees: Fees, gas: int) -> dict[str, Any]:
        return {
            "from": sender,
            "nonce": nonce,
            "gas": gas,
            "maxFeePerGas": fees.max_fee,
            "maxPriorityFeePerGas": fees.priority_fee,
            "chainId": self.chain_id,
            "type": 2,
        }

    def sign_settle(
        self,
        key: Signer,
        epoch: int,
        usage_root: bytes,
        reward_root: bytes,
        interactions: int,
        epoch_reward: int,
        nonce: int,
        fees: Fees,
    ) -> bytes:
        """The signed raw settle tx (not sent: the caller writes it ahead first)."""
        fn = self.contract.functions.settle(epoch, usage_root, reward_root, interactions, epoch_reward)
        tx = fn.build_transaction(self._tx_fields(key.address, nonce, fees, self.settings.settle_gas_limit))
        return key.sign_transaction(tx)

    def preflight_settle(
        self,
        sender: str,
        epoch: int,
        usage_root: bytes,
        reward_root: bytes,
        interactions: int,
        epoch_reward: int,
    ) -> None:
        """Simulate settle; raises ContractReverted with the custom error's name if it would fail."""
        fn = self.contract.functions.settle(epoch, usage_root, reward_root, interactions, epoch_reward)
        self._keep_time()
        self._simulate(fn, sender)

    def _keep_time(self) -> None:
        """Embedded chain only: bring its clock up to now. py-evm stamps a block with the time the
        block before it was mined and mines only on transactions, so an idle embedded chain's clock
        stands still, and settle, which waits for an epoch's end by block.timestamp, would be refused
        for good. An empty block at the current second fixes it; nodes (anvil, real chains) keep
        their own clock."""
        if self._tester is None:
            return
        now = int(time.time())
        if self._tester.get_block_by_number("pending")["timestamp"] <= now:
            self._tester.time_travel(now + 1)  # mines a block at `now`; the next one is at now + 1

    def send_raw(self, raw: bytes) -> bytes:
        """Broadcast signed bytes; a node that already has them is not an error (idempotent), nor one
        that refuses them for now as priced below the block's base fee: the settler sees the tx
        pending or dropped on its next pass and re-prices it (up to the fee cap)."""
        tx_hash = Web3.keccak(raw)
        try:
            self._rpc(lambda: self.w3.eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            text = str(exc).lower()
            if not any(m in text for m in ("already known", "already imported", "less than block base fee")):
                raise
        return bytes(tx_hash)

    def tx_info(self, tx_hash: bytes) -> TxInfo:
        def read() -> TxInfo:
            try:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                receipt = None
            if receipt is not None and receipt.get("blockNumber") is not None:
                return TxInfo("mined", receipt["status"] == 1, receipt["blockNumber"])
            try:
                self.w3.eth.get_transaction(tx_hash)
            except TransactionNotFound:
                return TxInfo("unknown")
            return TxInfo("pending")

        return self._rpc(read)

    def wait_receipt(self, tx_hash: bytes, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The receipt, or None if the tx is not mined within the timeout (web3's own wait, which also
        waits through a node's "transaction indexing in progress")."""
        timeout = timeout_s if timeout_s is not None else self.settings.receipt_timeout_s
        try:
            receipt = self._rpc(
                lambda: self.w3.eth.wait_for_transaction_receipt(
                    tx_hash, timeout=timeout, poll_latency=self.settings.poll_interval_s
                )
            )
        except TimeExhausted:
            return None
        return dict(receipt)

    def claim(self, key: Signer, account: str, cumulative: int, proof: list[bytes]) -> dict[str, Any]:
        """Claim for `account` (tokens go to it; `key` only pays gas). Raises ContractReverted."""
        fn = self.contract.functions.claim(to_checksum_address(account), cumulative, proof)
        self._simulate(fn, key.address)
        tx = fn.build_transaction(
            self._tx_fields(key.address, self.nonce(key.address), self.fees(), self.settings.claim_gas_limit)
        )
        receipt = self.wait_receipt(self.send_raw(key.sign_transaction(tx)))
        if receipt is None:
            raise ChainUnavailable("the claim was sent but not mined in time; check its status later")
        return receipt

    def transact(self, key: Signer, function: str, *args: Any, gas: int = 200_000) -> dict[str, Any]:
        """Call any contract function from `key` (simulated first, so reverts come back by name)."""
        fn = getattr(self.contract.functions, function)(*args)
        self._simulate(fn, key.address)
        tx = fn.build_transaction(self._tx_fields(key.address, self.nonce(key.address), self.fees(), gas))
        return self.wait_receipt(self.send_raw(key.sign_transaction(tx)))

    # -- errors ---------------------------------------------------------------------------------

    def _simulate(self, fn: Any, sender: str) -> None:
        # Against the pending block, where the tx would land: its timestamp is the node's clock now,
        # while the latest block's stands still on a chain that mines only on transactions (anvil).
        self._raise_by_name(lambda: fn.call({"from": sender}, block_identifier="pending"))

    def _raise_by_name(self, call: Callable[[], Any]) -> None:
        """Run an eth_call; a revert comes back as ContractReverted with the custom error's name."""
        try:
            self._rpc(call)
        except ContractCustomError as exc:
            raise self.decode_error(exc.data) from None
        except Exception as exc:
            # eth-tester raises TransactionFailed("execution reverted: b'...'") instead of the
            # JSON-RPC error a real node returns; recover the revert bytes from it.
            text = str(exc)
            if type(exc).__name__ != "TransactionFailed" or ("b'" not in text and 'b"' not in text):
                raise
            data = ast.literal_eval(text[text.index("b") :].strip())
            raise self.decode_error(data) from None

    def decode_error(self, data: Any) -> ContractReverted:
        raw = bytes.fromhex(data[2:]) if isinstance(data, str) else bytes(data or b"")
        entry = self._errors.get(raw[:4])
        if entry is None:
            return ContractReverted(f"unknown error 0x{raw[:4].hex()}")
        types = [i["type"] for i in entry["inputs"]]
        return ContractReverted(entry["name"], tuple(self.w3.codec.decode(types, raw[4:])))

    def _rpc(self, call):
        """Run one node call; connection failures become ChainUnavailable (settlement retries)."""
        try:
            return call()
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise ChainUnavailable(
                f"the chain node at {redact_url(self.settings.url)} is not reachable ({type(exc).__name__})"
            ) from None
        except Exception as exc:
            # requests' ConnectionError does not subclass the builtin one; match it by module.
            if type(exc).__module__.startswith(("requests", "urllib3")):
                raise ChainUnavailable(
                    f"the chain node at {redact_url(self.settings.url)} is not reachable ({type(exc).__name__})"
                ) from None
            raise

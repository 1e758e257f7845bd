"""`meritnet settlement ...` / `python -m settlement ...`: export trees, prove and verify, claim, run,
status, accept the settler role.

One typer app; the main `meritnet` CLI mounts this same object as its `settlement` group. Settings
come from the environment (MERITNET_SETTLEMENT_* for the ledger, MERITNET_CHAIN_* for the chain,
MERITNET_SETTLER_KEY[_FILE] for the key) and the options below override the common ones.

A proof file (written by `prove`) is self-contained: tree kind, epoch, leaf encoding, value and
proof; `verify` checks it against the root the contract holds, so anyone with chain access can
audit one interaction or one operator's reward without the ledger. `claim` is the operator's side:
its cumulative reward, proven against the root on-chain, minted to it in a tx it signs itself. A
reward root is claimable `claim_delay` seconds after its settle (before that the admin may veto it):
`claim` proves against the claimable root, waiting for a pending one that is due within --wait-s.
Epoch length and genesis are read from the ledger a command opens, never passed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:  # imported where used: web3 and the chain client cost a second, `--help` should not
    from settlement.chain import Chain
    from settlement.config import SettlementConfig
    from settlement.rewardbook import EpochCommitment

app = typer.Typer(
    help="Settlement: usage/reward Merkle trees, proofs against the chain, the settler.", no_args_is_help=True
)


LedgerOption = Annotated[
    Path | None, typer.Option(help="Ledger path (default: MERITNET_SETTLEMENT_LEDGER_PATH).")
]
EpochLengthOption = Annotated[
    float | None,
    typer.Option(help="Epoch length in seconds; only for a new ledger (an existing one knows its own)."),
]
ContractOption = Annotated[
    str | None, typer.Option(help="Distributor address (default: MERITNET_CHAIN_CONTRACT).")
]
UrlOption = Annotated[str | None, typer.Option(help="JSON-RPC URL (default: MERITNET_CHAIN_URL).")]


class TreeKind(StrEnum):
    usage = "usage"
    rewards = "rewards"


def _config(ledger: Path | None, epoch_length: float | None) -> SettlementConfig:
    """Settings from the options and the environment; an existing ledger's own epoch length and
    genesis win (it was written with them), so audits of a ledger need neither flag."""
    from settlement.config import SettlementConfig
    from settlement.ledger import UsageLedger

    overrides: dict[str, Any] = {}
    if ledger is not None:
        overrides["ledger_path"] = ledger
    if epoch_length is not None:
        overrides["epoch_length_s"] = epoch_length
    config = SettlementConfig(**overrides)
    stored = UsageLedger.stored_settings(config.ledger_path)
    if stored is None:
        return config
    length, genesis = stored
    if "epoch_length_s" in config.model_fields_set and config.epoch_length_s != length:
        raise typer.BadParameter(
            f"the ledger at {config.ledger_path} uses epochs of {length:g} s, not {config.epoch_length_s:g} s; "
            "drop --epoch-length (it is read from the ledger)"
        )
    return config.model_copy(update={"epoch_length_s": length, "genesis": genesis})


def _ledger(config: SettlementConfig):
    from settlement.ledger import UsageLedger

    if not Path(config.ledger_path).exists():
        raise typer.BadParameter(
            f"no ledger at {config.ledger_path}; pass --ledger or set MERITNET_SETTLEMENT_LEDGER_PATH"
        )
    return UsageLedger(config.ledger_path, config.epoch_length_s, genesis=config.genesis)


def build_tree(config: SettlementConfig, epoch: int, tree: TreeKind):
    """The epoch's usage tree (from the frozen ledger) or reward tree (from the committed amounts)."""
    from settlement.trees import EmptyTreeError, reward_tree, usage_tree

    if tree is TreeKind.usage:
        frozen = _ledger(config).frozen_epoch(epoch)
        if frozen is None:
            raise typer.BadParameter(f"epoch {epoch} is not closed yet; it has no usage tree")
        try:
            return usage_tree(frozen)
        except EmptyTreeError:
            raise typer.BadParameter(
                f"epoch {epoch} has no ok usage, so no usage tree (root is zero)"
            ) from None
    from settlement.rewardbook import RewardBook

    commitment = RewardBook(config.book_path).get(epoch)
    if commitment is None:
        raise typer.BadParameter(f"epoch {epoch} has no committed rewards yet (the settler commits them)")
    try:
        return reward_tree(commitment.cumulative)
    except EmptyTreeError:
        raise typer.BadParameter(f"epoch {epoch} has no rewards yet (no eligible usage so far)") from None


def _find(tree, kind: TreeKind, key: str) -> int:
    """Value index of a request id's leaf (usage tree) or an operator's leaf (reward tree)."""
    from settlement.merkle import MerkleTreeError
    from settlement.trees import find_reward_leaf, find_usage_leaf

    try:
        return find_usage_leaf(tree, key) if kind is TreeKind.usage else find_reward_leaf(tree, key)
    except MerkleTreeError as exc:
        raise typer.BadParameter(str(exc)) from None


def _root_hex(root: Any) -> str:
    return root if isinstance(root, str) else "0x" + bytes(root).hex()


@app.command()
def export(
    epoch: Annotated[int, typer.Option(help="Epoch number.")],
    tree: Annotated[
        TreeKind, typer.Option(help="usage (one leaf per interaction) or rewards (one per operator).")
    ],
    out: Annotated[
        Path, typer.Option(help="Output file (OpenZeppelin StandardMerkleTree dump, standard-v1).")
    ],
    ledger: LedgerOption = None,
    epoch_length: EpochLengthOption = None,
) -> None:
    """Write an epoch's usage or reward tree in OpenZeppelin's dump format."""
    merkle = build_tree(_config(ledger, epoch_length), epoch, tree)
    out.write_text(json.dumps(merkle.dump(), indent=2) + "\n")
    typer.echo(f"wrote {out}: {len(merkle)} leaves, root {_root_hex(merkle.root)}")


@app.command()
def prove(
    epoch: Annotated[int, typer.Option(help="Epoch number.")],
    request_id: Annotated[str | None, typer.Option(help="Prove one interaction (usage tree).")] = None,
    operator: Annotated[
        str | None, typer.Option(help="Prove an operator's cumulative reward (reward tree).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the proof here instead of stdout.")] = None,
    ledger: LedgerOption = None,
    epoch_length: EpochLengthOption = None,
) -> None:
    """Give the inclusion proof of a request id or an operator (a self-contained JSON file)."""
    if (request_id is None) == (operator is None):
        raise typer.BadParameter("pass exactly one of --request-id or --operator")
    kind = TreeKind.usage if request_id is not None else TreeKind.rewards
    merkle = build_tree(_config(ledger, epoch_length), epoch, kind)
    index = _find(merkle, kind, request_id or operator)
    proof = {
        "tree": kind.value,
        "epoch": epoch,
        "root": _root_hex(merkle.root),
        "leafEncoding": list(merkle.leaf_encoding),
        "value": merkle.dump()["values"][index]["value"],
        "proof": merkle.get_proof(index),
    }
    text = json.dumps(proof, indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}")


def onchain_root(chain: Chain, kind: str, epoch: int) -> bytes:
    """The root the contract committed: usage roots per epoch in storage, reward roots in the epoch's event."""
    if kind == TreeKind.usage.value:
        return chain.usage_root(epoch)
    events = chain.settled_events(epoch)
    if not events or epoch >= chain.next_epoch():  # a vetoed epoch has an event but is not settled
        raise typer.BadParameter(f"epoch {epoch} is not settled on-chain (none, or its root was vetoed)")
    return bytes(events[-1]["reward_root"])


def _when(timestamp: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pending_note(chain: Chain) -> str:
    """'' or a sentence on the reward root still in its veto window (not claimable yet)."""
    window = chain.root_window()
    if not window.pending:
        return ""
    return (
        f"; the reward root of epoch {window.latest_epoch} is pending until {_when(window.claimable_at)} "
        f"(in {window.claimable_at - window.now} s; the admin may veto it until then): claim again after that"
    )


def _bound_chain(contract: str | None, url: str | None) -> Chain:
    """The distributor named by the options, else by MERITNET_CHAIN_CONTRACT / MERITNET_CHAIN_URL."""
    from eth_utils import is_address

    from settlement.chain import Chain, ChainSettings, redact_url

    settings = ChainSettings(**{k: v for k, v in {"contract": contract, "url": url}.items() if v})
    if not settings.contract:
        raise typer.BadParameter("no contract address: pass --contract or set MERITNET_CHAIN_CONTRACT")
    if not is_address(settings.contract):
        raise typer.BadParameter(f"--contract {settings.contract!r} is not an address (0x and 40 hex digits)")
    chain = Chain.connect(settings)
    with chain_errors():
        if not chain.has_code():
            where = redact_url(settings.url)
            hint = (
                " (the embedded chain lives inside `meritnet up`: pass --url of a JSON-RPC node)"
                if where == "embedded"
                else ""
            )
            _fail(f"no contract at {chain.address} on the chain at {where}{hint}: wrong --contract or --url?")
    return chain


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def chain_errors() -> Iterator[None]:
    """Chain failures as one line each (exit 1), never a traceback: unreachable node, a contract that
    is not a distributor, a reverted call, a node that refused the transaction."""
    from web3.exceptions import BadFunctionCallOutput, ContractLogicError, Web3RPCError

    from settlement.chain import ChainUnavailable, ContractReverted

    try:
        yield
    except ChainUnavailable as exc:
        _fail(str(exc))
    except ContractReverted as exc:
        _fail(f"the contract refused: {exc.error}{exc.error_args}")
    except (BadFunctionCallOutput, ContractLogicError):
        _fail("the contract does not answer as a meritnet distributor: wrong --contract?")
    except Web3RPCError as exc:
        _fail(f"the chain node refused the request: {exc.message or exc}")


@app.command()
def verify(
    proof_file: Annotated[Path, typer.Argument(help="A proof written by `prove`.")],
    contract: ContractOption = None,
    url: UrlOption = None,
) -> None:
    """Check a proof against the root the contract holds; exit code 1 if it does not verify."""
    from settlement.merkle import StandardMerkleTree

    proof = json.loads(proof_file.read_text())
    chain = _bound_chain(contract, url)
    with chain_errors():
        root = onchain_root(chain, proof["tree"], int(proof["epoch"]))
        window = chain.root_window()
    ok = StandardMerkleTree.verify("0x" + root.hex(), proof["leafEncoding"], proof["value"], proof["proof"])
    pending = window.pending and int(proof["epoch"]) == window.latest_epoch
    typer.echo(
        f"{'VALID' if ok else 'INVALID'}: {proof['tree']} leaf of epoch {proof['epoch']} against "
        f"on-chain root 0x{root.hex()}"
        + (f" (pending: the admin may veto it until {_when(window.claimable_at)})" if pending else "")
    )
    raise typer.Exit(0 if ok else 1)


@app.command("accept-settler")
def accept_settler(
    key_file: Annotated[
        Path, typer.Option(help="File (chmod 600) holding the private key the admin proposed as settler.")
    ],
    contract: ContractOption = None,
    url: UrlOption = None,
) -> None:
    """Take the settler role the admin proposed for this key (the second step of a rotation).

    The key pays the gas. Afterwards run the settler with this key (MERITNET_SETTLER_KEY_FILE)."""
    from settlement.chain import ContractReverted
    from settlement.keys import SettlerKey, SettlerKeyError

    try:
        key = SettlerKey.from_file(key_file)
    except SettlerKeyError as exc:
        raise typer.BadParameter(str(exc)) from None
    chain = _bound_chain(contract, url)
    try:
        receipt = chain.transact(key, "accept_settler")
    except ContractReverted as exc:
        if exc.error != "NotPendingSettler":
            raise
        typer.echo(
            f"{key.address} is not the proposed settler of {chain.address} (proposed: "
            f"{chain.pending_settler()}); the admin proposes it first with propose_settler",
            err=True,
        )
        raise typer.Exit(1) from None
    if receipt is None or receipt["status"] != 1:
        typer.echo("the accept_settler tx was not mined (or failed); check the chain and retry", err=True)
        raise typer.Exit(1)
    typer.echo(f"{key.address} is now the settler of {chain.address}")


@app.command("set-stake")
def set_stake(
    validator: Annotated[
        str, typer.Option(help="The validator's address (the key that signs its score reports).")
    ],
    stake: Annotated[
        float, typer.Option(min=0, help="Its stake, e.g. 2.0 (0 removes its weight in consensus).")
    ],
    admin_key_file: Annotated[
        Path, typer.Option(help="File (chmod 600) holding the distributor admin's private key; it pays gas.")
    ],
    contract: ContractOption = None,
    url: UrlOption = None,
) -> None:
    """Record a validator's stake on the distributor: consensus weighs each validator by this record
    (read every 30 s), never by what the validator says. An admin that is a multisig sends
    `set_stake(validator, stake * 10**18)` through the multisig instead."""
    from eth_utils import is_address

    from settlement.chain import ContractReverted
    from settlement.config import stake_units
    from settlement.keys import SettlerKey, SettlerKeyError

    if not is_address(validator):
        raise typer.BadParameter(f"--validator {validator!r} is not an address (0x and 40 hex digits)")
    try:
        key = SettlerKey.from_file(admin_key_file, what="admin key")
    except SettlerKeyError as exc:
        raise typer.BadParameter(str(exc)) from None
    chain = _bound_chain(contract, url)
    with chain_errors():
        try:
            receipt = chain.transact(key, "set_stake", validator, stake_units(stake))
        except ContractReverted as exc:
            if exc.error != "NotAdmin":
                raise
            _fail(f"{key.address} is not the admin of {chain.address} (the admin is {chain.admin()})")
        if receipt is None or receipt["status"] != 1:
            _fail("the set_stake tx was not mined (or failed); check the chain and retry")
        recorded = chain.stake(validator)
    typer.echo(f"{validator} has stake {recorded / 10**18:g} on {chain.address}")


@app.command()
def run(
    until_idle: Annotated[bool, typer.Option(help="Settle every closed/due epoch, then exit.")] = False,
    ledger: LedgerOption = None,
    epoch_length: EpochLengthOption = None,
) -> None:
    """Run the settler: close due epochs and settle them in order (key from MERITNET_SETTLER_KEY[_FILE])."""
    from settlement.actor import SettlementService

    service = SettlementService(_config(ledger, epoch_length))
    typer.echo(f"settling on contract {service.chain.address} as {service.key.address}")
    if until_idle:
        settled = service.settler.tick()
        typer.echo(json.dumps({"settled": settled, **service.status()}))
    else:
        service.run()


@app.command()
def status(
    ledger: LedgerOption = None,
    epoch_length: EpochLengthOption = None,
    contract: ContractOption = None,
    url: UrlOption = None,
) -> None:
    """Ledger and chain progress: last closed, committed and settled epochs, totals, roles, pause."""
    config = _config(ledger, epoch_length)
    led = _ledger(config)
    from settlement.chain import ChainSettings
    from settlement.rewardbook import RewardBook

    latest = RewardBook(config.book_path).latest()
    report: dict[str, Any] = {
        "last_closed_epoch": led.last_closed_epoch(),
        "last_committed_epoch": None if latest is None else latest.epoch,
    }
    if contract or ChainSettings().contract:
        chain = _bound_chain(contract, url)
        with chain_errors():
            genesis, length = chain.epochs()
            report |= {
                "contract": chain.address,
                "next_epoch": chain.next_epoch(),
                "total_rewarded": str(chain.total_rewarded()),
                "total_claimed": str(chain.total_supply()),
                "emission_cap": str(chain.emission_cap()),
                "genesis": genesis,
                "epoch_length_s": length,
                "settler": chain.settler(),
                "admin": chain.admin(),
                "paused": chain.paused(),
            }
    typer.echo(json.dumps(report, indent=2))


def _operator_key(path: Path):
    from settlement.keys import SettlerKey, SettlerKeyError

    try:
        return SettlerKey.from_file(path, what="operator key")
    except SettlerKeyError as exc:
        _fail(str(exc))


def settled_rewards(config: SettlementConfig, chain: Chain) -> EpochCommitment:
    """The committed epoch whose reward root claims verify against now (the last one settled whose
    veto window has passed): its cumulative amounts are what every operator can claim. A root this
    ledger never committed means the contract or the ledger is not the one the other belongs to."""
    from settlement.rewardbook import RewardBook

    if not Path(config.book_path).is_file():
        _fail(f"no reward book beside the ledger ({config.book_path}); pass the network's --ledger")
    with chain_errors():
        last = chain.root_window().claimable_epoch
        root = chain.reward_root()
        # A distributor deployed mid-life starts at a later epoch: a zero root may mean none settled yet.
        unsettled = last < 0 or (root == bytes(32) and not chain.settled_events(last))
        note = pending_note(chain) if unsettled else ""
    if unsettled:
        _fail(f"no reward yet: no epoch is claimable on {chain.address} yet{note}")
    committed = RewardBook(config.book_path).get(last)
    if committed is None or committed.reward_root != root:
        _fail(
            f"the reward root of epoch {last} on {chain.address} (0x{root.hex()}) is not the one this "
            f"ledger committed: wrong --contract, or another network's --ledger?"
        )
    return committed


@app.command()
def claim(
    operator_key_file: Annotated[
        Path,
        typer.Option(
            help="The operator's key (a hex key file, chmod 600, or an eth-account keystore JSON); it signs "
            "and pays gas."
        ),
    ],
    network: Annotated[
        str | None,
        typer.Option(
            help="The network's endpoint, e.g. https://net.example.com: the proof comes from it (GET "
            "/v1/operators/ADDRESS/proof) and is checked against the root on-chain; no ledger needed."
        ),
    ] = None,
    rpc_url: Annotated[
        str | None,
        typer.Option(help="JSON-RPC URL of the chain (default: the one the network names, --url)."),
    ] = None,
    ledger: LedgerOption = None,
    contract: ContractOption = None,
    url: UrlOption = None,
    wait_s: Annotated[
        float,
        typer.Option(
            min=0,
            help="Wait up to this long for a reward root still in its veto window (pending) to become "
            "claimable; one due later is left for the next claim.",
        ),
    ] = 120.0,
) -> None:
    """Claim the operator's cumulative reward through the last claimable epoch (a validator passes its
    validator key file, state_dir/validator-keys/<id>.key, and claims the same way): mints what it has not
    claimed yet. An epoch's reward root is claimable claim_delay seconds after its settle (until then the
    admin may veto it); a pending root due within --wait-s is waited for. With --network the proof is the
    network's, checked against the root on-chain before the claim is sent; without it, the proof comes
    from the ledger's reward tree on this machine."""
    key = _operator_key(operator_key_file)
    if network is not None:
        chain, cumulative, proof, epoch = _network_proof(
            network, key.address, contract, rpc_url or url, wait_s
        )
    else:
        chain, cumulative, proof, epoch = _ledger_proof(key.address, ledger, contract, rpc_url or url, wait_s)
    with chain_errors():
        already = chain.claimed(key.address)
        if already >= cumulative:
            typer.echo(
                f"nothing to claim: {key.address} has claimed {already} wei, all of its cumulative reward "
                f"through epoch {epoch}{pending_note(chain)}"
            )
            return
        receipt = chain.claim(key, key.address, cumulative, proof)
    tx = "0x" + bytes(receipt["transactionHash"]).hex()
    if receipt["status"] != 1:
        _fail(f"the claim tx {tx} failed on-chain (out of gas?)")
    typer.echo(
        f"claimed {cumulative - already} wei for {key.address} (cumulative {cumulative} wei through "
        f"epoch {epoch}) in tx {tx}"
    )


def wait_for_pending_root(chain: Chain, wait_s: float) -> bool:
    """Sleep until a reward root in its veto window becomes claimable, if that is within `wait_s`
    (said on stderr: stdout stays the claim's result). True if it waited."""
    import time

    with chain_errors():
        window = chain.root_window()
    left = window.claimable_at - window.now
    if not window.pending or left > wait_s:
        return False
    typer.echo(
        f"the reward root of epoch {window.latest_epoch} is pending until {_when(window.claimable_at)} "
        f"(the admin may veto it until then); waiting {left} s for it to become claimable",
        err=True,
    )
    time.sleep(left + 1)  # block timestamps are whole seconds
    return True


def _ledger_proof(account: str, ledger: Path | None, contract: str | None, url: str | None, wait_s: float):
    """(chain, cumulative, proof, epoch) from the network's own ledger and reward book (the runner's side)."""
    from settlement.merkle import MerkleTreeError
    from settlement.trees import EmptyTreeError, find_reward_leaf, reward_tree

    config = _config(ledger, None)
    _ledger(config)  # a clear error when there is no ledger here
    chain = _bound_chain(contract, url)
    wait_for_pending_root(chain, wait_s)
    committed = settled_rewards(config, chain)
    try:
        tree = reward_tree(committed.cumulative)
        index = find_reward_leaf(tree, account)
    except (EmptyTreeError, MerkleTreeError):
        with chain_errors():
            note = pending_note(chain)
        _fail(f"no reward yet for {account} through epoch {committed.epoch} (its nodes earned nothing){note}")
    proof = [bytes.fromhex(p[2:]) for p in tree.get_proof(index)]
    return chain, int(tree.at(index)[1]), proof, committed.epoch


def fetch_proof(network: str, account: str) -> dict[str, Any]:
    """The network's proof document for `account` (GET /v1/operators/{account}/proof)."""
    import httpx

    target = f"{network.rstrip('/')}/v1/operators/{account}/proof"
    try:
        answer = httpx.get(target, timeout=30)  # https: certificates verified (httpx's default)
        doc = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        _fail(
            f"could not read a proof from {network} ({type(exc).__name__}); is the network up at that address?"
        )
    if answer.status_code != 200 or not isinstance(doc, dict):
        message = (doc.get("error") or {}).get("message") if isinstance(doc, dict) else None
        _fail(f"{network} gave no proof for {account} ({answer.status_code}): {message or answer.text[:200]}")
    return doc


def _network_proof(network: str, account: str, contract: str | None, url: str | None, wait_s: float):
    """(chain, cumulative, proof, epoch) from the network's proof, checked against the chain itself."""
    from settlement.chain import ChainSettings
    from settlement.proofs import ProofRejected, check_reward_proof

    doc = fetch_proof(network, account)
    if contract and doc.get("contract") and contract.lower() != str(doc["contract"]).lower():
        _fail(f"the network pays from contract {doc['contract']}, not --contract {contract}")
    url = url or doc.get("rpc_url") or ChainSettings().url
    if url == "embedded":
        _fail(
            f"{network} names no public JSON-RPC URL for chain {doc.get('chain_id')}: pass --rpc-url of a node "
            "on that chain"
        )
    chain = _bound_chain(contract or doc.get("contract"), url)
    if wait_for_pending_root(chain, wait_s):
        doc = fetch_proof(network, account)  # the network now proves the root that became claimable
    with chain_errors():
        try:
            cumulative, proof = check_reward_proof(doc, chain, account)
        except ProofRejected as exc:
            _fail(f"not sent: {exc}")
    return chain, cumulative, proof, doc.get("epoch")

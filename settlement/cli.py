"""`meritnet settlement ...` / `python -m settlement ...`: export trees, prove and verify, claim, run,
status, accept the settler role.

One typer app; the main `meritnet` CLI mounts this same object as its `settlement` group. Settings
come from the environment (MERITNET_SETTLEMENT_* for the ledger, MERITNET_CHAIN_* for the chain,
MERITNET_SETTLER_KEY[_FILE] for the key) and the options below override the common ones.

A proof file (written by `prove`) is self-contained: tree kind, epoch, leaf encoding, value and
proof; `verify` checks it against the root the contract holds, so anyone with chain access can
audit one interaction or one operator's reward without the ledger. `claim` is the operator's side
(settlement/claim.py). Epoch length and genesis are read from the ledger a command opens, never
passed; what the commands share is in settlement/cli_common.py.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from settlement.claim import claim
from settlement.cli_common import (
    ContractOption,
    EpochLengthOption,
    LedgerOption,
    UrlOption,
    bound_chain,
    chain_errors,
    fail,
    open_ledger,
    settlement_config,
    when,
)

if TYPE_CHECKING:  # imported where used: web3 and the chain client cost a second, `--help` should not
    from settlement.chain import Chain
    from settlement.config import SettlementConfig

app = typer.Typer(
    help="Settlement: usage/reward Merkle trees, proofs against the chain, the settler.", no_args_is_help=True
)


class TreeKind(StrEnum):
    usage = "usage"
    rewards = "rewards"


def build_tree(config: SettlementConfig, epoch: int, tree: TreeKind):
    """The epoch's usage tree (from the frozen ledger) or reward tree (from the committed amounts)."""
    from settlement.trees import EmptyTreeError, reward_tree, usage_tree

    if tree is TreeKind.usage:
        frozen = open_ledger(config).frozen_epoch(epoch)
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
    merkle = build_tree(settlement_config(ledger, epoch_length), epoch, tree)
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
    merkle = build_tree(settlement_config(ledger, epoch_length), epoch, kind)
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


@app.command()
def verify(
    proof_file: Annotated[Path, typer.Argument(help="A proof written by `prove`.")],
    contract: ContractOption = None,
    url: UrlOption = None,
) -> None:
    """Check a proof against the root the contract holds; exit code 1 if it does not verify."""
    from settlement.merkle import StandardMerkleTree

    proof = json.loads(proof_file.read_text())
    chain = bound_chain(contract, url)
    with chain_errors():
        root = onchain_root(chain, proof["tree"], int(proof["epoch"]))
        window = chain.root_window()
    ok = StandardMerkleTree.verify("0x" + root.hex(), proof["leafEncoding"], proof["value"], proof["proof"])
    pending = window.pending and int(proof["epoch"]) == window.latest_epoch
    typer.echo(
        f"{'VALID' if ok else 'INVALID'}: {proof['tree']} leaf of epoch {proof['epoch']} against "
        f"on-chain root 0x{root.hex()}"
        + (f" (pending: the admin may veto it until {when(window.claimable_at)})" if pending else "")
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
    chain = bound_chain(contract, url)
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
    chain = bound_chain(contract, url)
    with chain_errors():
        try:
            receipt = chain.transact(key, "set_stake", validator, stake_units(stake))
        except ContractReverted as exc:
            if exc.error != "NotAdmin":
                raise
            fail(f"{key.address} is not the admin of {chain.address} (the admin is {chain.admin()})")
        if receipt is None or receipt["status"] != 1:
            fail("the set_stake tx was not mined (or failed); check the chain and retry")
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

    service = SettlementService(settlement_config(ledger, epoch_length))
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
    config = settlement_config(ledger, epoch_length)
    led = open_ledger(config)
    from settlement.chain_settings import ChainSettings
    from settlement.rewardbook import RewardBook

    latest = RewardBook(config.book_path).latest()
    report: dict[str, Any] = {
        "last_closed_epoch": led.last_closed_epoch(),
        "last_committed_epoch": None if latest is None else latest.epoch,
    }
    if contract or ChainSettings().contract:
        chain = bound_chain(contract, url)
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


app.command()(claim)

"""`meritnet settlement claim`: an operator's (or validator's) side of settlement. Its cumulative reward,
proven against the reward root on-chain, is minted to it in a tx it signs itself.

The proof comes from the network (`--network`: GET /v1/operators/ADDRESS/proof, checked against the
root on-chain before anything is sent; no ledger needed) or from the ledger's reward tree on this
machine (the runner's side). A reward root is claimable `claim_delay` seconds after its settle (before
that the admin may veto it): `claim` proves against the claimable root, waiting for a pending one that
is due within --wait-s. Registered on the settlement app by `settlement.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from settlement.cli_common import (
    ContractOption,
    LedgerOption,
    UrlOption,
    bound_chain,
    chain_errors,
    fail,
    open_ledger,
    pending_note,
    settlement_config,
    wait_for_pending_root,
)

if TYPE_CHECKING:  # imported where used: web3 and the chain client cost a second, `--help` should not
    from settlement.chain import Chain
    from settlement.config import SettlementConfig
    from settlement.rewardbook import EpochCommitment


def _operator_key(path: Path):
    from settlement.keys import SettlerKey, SettlerKeyError

    try:
        return SettlerKey.from_file(path, what="operator key")
    except SettlerKeyError as exc:
        fail(str(exc))


def settled_rewards(config: SettlementConfig, chain: Chain) -> EpochCommitment:
    """The committed epoch whose reward root claims verify against now (the last one settled whose
    veto window has passed): its cumulative amounts are what every operator can claim. A root this
    ledger never committed means the contract or the ledger is not the one the other belongs to."""
    from settlement.rewardbook import RewardBook

    if not Path(config.book_path).is_file():
        fail(f"no reward book beside the ledger ({config.book_path}); pass the network's --ledger")
    with chain_errors():
        last = chain.root_window().claimable_epoch
        root = chain.reward_root()
        # A distributor deployed mid-life starts at a later epoch: a zero root may mean none settled yet.
        unsettled = last < 0 or (root == bytes(32) and not chain.settled_events(last))
        note = pending_note(chain) if unsettled else ""
    if unsettled:
        fail(f"no reward yet: no epoch is claimable on {chain.address} yet{note}")
    committed = RewardBook(config.book_path).get(last)
    if committed is None or committed.reward_root != root:
        fail(
            f"the reward root of epoch {last} on {chain.address} (0x{root.hex()}) is not the one this "
            f"ledger committed: wrong --contract, or another network's --ledger?"
        )
    return committed


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
        fail(f"the claim tx {tx} failed on-chain (out of gas?)")
    typer.echo(
        f"claimed {cumulative - already} wei for {key.address} (cumulative {cumulative} wei through "
        f"epoch {epoch}) in tx {tx}"
    )


def _ledger_proof(account: str, ledger: Path | None, contract: str | None, url: str | None, wait_s: float):
    """(chain, cumulative, proof, epoch) from the network's own ledger and reward book (the runner's side)."""
    from settlement.merkle import MerkleTreeError
    from settlement.trees import EmptyTreeError, find_reward_leaf, reward_tree

    config = settlement_config(ledger, None)
    open_ledger(config)  # a clear error when there is no ledger here
    chain = bound_chain(contract, url)
    wait_for_pending_root(chain, wait_s)
    committed = settled_rewards(config, chain)
    try:
        tree = reward_tree(committed.cumulative)
        index = find_reward_leaf(tree, account)
    except (EmptyTreeError, MerkleTreeError):
        with chain_errors():
            note = pending_note(chain)
        fail(f"no reward yet for {account} through epoch {committed.epoch} (its nodes earned nothing){note}")
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
        fail(
            f"could not read a proof from {network} ({type(exc).__name__}); is the network up at that address?"
        )
    if answer.status_code != 200 or not isinstance(doc, dict):
        message = (doc.get("error") or {}).get("message") if isinstance(doc, dict) else None
        fail(f"{network} gave no proof for {account} ({answer.status_code}): {message or answer.text[:200]}")
    return doc


def _network_proof(network: str, account: str, contract: str | None, url: str | None, wait_s: float):
    """(chain, cumulative, proof, epoch) from the network's proof, checked against the chain itself."""
    from settlement.chain_settings import ChainSettings
    from settlement.proofs import ProofRejected, check_reward_proof

    doc = fetch_proof(network, account)
    if contract and doc.get("contract") and contract.lower() != str(doc["contract"]).lower():
        fail(f"the network pays from contract {doc['contract']}, not --contract {contract}")
    url = url or doc.get("rpc_url") or ChainSettings().url
    if url == "embedded":
        fail(
            f"{network} names no public JSON-RPC URL for chain {doc.get('chain_id')}: pass --rpc-url of a node "
            "on that chain"
        )
    chain = bound_chain(contract or doc.get("contract"), url)
    if wait_for_pending_root(chain, wait_s):
        doc = fetch_proof(network, account)  # the network now proves the root that became claimable
    with chain_errors():
        try:
            cumulative, proof = check_reward_proof(doc, chain, account)
        except ProofRejected as exc:
            fail(f"not sent: {exc}")
    return chain, cumulative, proof, doc.get("epoch")

"""`meritnet receipt verify REQUEST_ID --network URL`: a client checks, on its own, that its request was
recorded and billed as it saw it. The network serves the receipt (`GET /v1/receipts/{request_id}`:
the usage leaf, its proof and the epoch's root); nothing of it is trusted: the leaf must be the
request's (its id hashed), its token counts and model the ones the receipt bills, the proof must lead
to the root, and the root must be the usage root the distributor holds for that epoch on a chain the
client reaches itself. With the client's own copies of the bodies (`--request-body`, `--response-body`),
their sha256 must also be the leaf's request and response hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from settlement.cli_common import bound_chain, chain_errors, fail

app = typer.Typer(help="A client's receipts: its own request, proven on-chain.", no_args_is_help=True)


class ReceiptRejected(ValueError):
    """A receipt that does not prove what it says; the message says what did not match."""


def check_receipt(
    doc: dict[str, Any],
    request_id: str,
    onchain_root: bytes,
    bodies: tuple[bytes | None, bytes | None] = (None, None),
) -> dict[str, Any]:
    """The billed facts of a settled receipt, once its leaf is shown to be `request_id`'s, to carry
    those facts, and to be under `onchain_root` (the distributor's usage root of its epoch). `bodies`:
    the client's own copies of the request body it sent and the response body it got, if it kept them;
    each must hash to the leaf's."""
    try:
        return _check_receipt(doc, request_id, onchain_root, bodies)
    except ReceiptRejected:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # malformed: a rejection, not a crash
        raise ReceiptRejected(f"the network's answer is not a usage receipt ({type(exc).__name__})") from None


def _check_receipt(
    doc: dict[str, Any], request_id: str, onchain_root: bytes, bodies: tuple[bytes | None, bytes | None]
) -> dict[str, Any]:
    from settlement.merkle import StandardMerkleTree
    from settlement.trees import USAGE_LEAF_ENCODINGS, body_hash, model_key, node_key, request_key

    value, proof, root, billed = doc["value"], doc["proof"], str(doc["root"]), doc["billed"]
    encoding = list(doc.get("leafEncoding", ()))
    if encoding not in USAGE_LEAF_ENCODINGS.values() or len(value) != len(encoding):
        raise ReceiptRejected(f"not a usage leaf: encoding {doc.get('leafEncoding')!r}")
    rid, node, operator, model, prompt, completion, epoch, *hashes = value
    expected = [
        request_key(request_id),
        node_key(str(billed.get("node_id"))),
        str(billed.get("operator")).lower(),
        model_key(str(billed.get("model"))),
        int(billed.get("prompt_tokens", -1)),
        int(billed.get("completion_tokens", -1)),
        int(doc.get("epoch", -1)),
    ]
    got = [str(rid).lower(), str(node).lower(), str(operator).lower(), str(model).lower()]
    got += [int(prompt), int(completion), int(epoch)]
    if hashes:  # a version 2 leaf: the bodies' hashes
        expected += [
            "0x" + body_hash(str(billed.get(f"{w}_hash", ""))).hex() for w in ("request", "response")
        ]
        got += [str(h).lower() for h in hashes]
    if got[0] != expected[0]:
        raise ReceiptRejected(f"the leaf is another request's, not {request_id}'s")
    if got[1:] != expected[1:]:
        raise ReceiptRejected("the leaf does not hold what the receipt says was billed")
    if not StandardMerkleTree.verify(root, encoding, value, proof):
        raise ReceiptRejected("the proof does not lead from the leaf to the receipt's root")
    if root.lower() != "0x" + onchain_root.hex():
        raise ReceiptRejected(f"the receipt's root {root} is not the usage root on-chain for epoch {epoch}")
    for what, body, committed in zip(("request", "response"), bodies, hashes or (None, None), strict=True):
        if body is not None and committed is None:
            raise ReceiptRejected(
                f"epoch {epoch}'s leaves predate body hashes: your {what} body cannot be checked"
            )
        if body is not None and "0x" + hashlib.sha256(body).hexdigest() != str(committed).lower():
            raise ReceiptRejected(f"your {what} body does not hash to the leaf's {what} hash {committed}")
    return billed


@app.command()
def verify(
    request_id: Annotated[str, typer.Argument(help="The x-meritnet-request-id header of your answer.")],
    network: Annotated[str, typer.Option(help="The network's endpoint, e.g. https://net.example.com.")],
    rpc_url: Annotated[str | None, typer.Option(help="JSON-RPC URL of the network's chain.")] = None,
    request_body: Annotated[
        Path | None, typer.Option(help="The exact body you sent (file): its sha256 must be the leaf's.")
    ] = None,
    response_body: Annotated[
        Path | None, typer.Option(help="The exact body you got (file; a stream: all of it): checked too.")
    ] = None,
) -> None:
    """Check your request's receipt against the chain: VALID (and what was billed) in one line."""
    import httpx

    try:
        answer = httpx.get(f"{network.rstrip('/')}/v1/receipts/{request_id}", timeout=30)
        doc = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        fail(f"could not read a receipt from {network} ({type(exc).__name__}); is the network up there?")
    if answer.status_code != 200 or not isinstance(doc, dict):
        fail(
            f"{network} has no receipt of {request_id}: {doc.get('error', {}).get('message', answer.text)[:300]}"
        )
    if doc.get("status") == "pending":
        fail(f"request {request_id} is in epoch {doc.get('epoch')}, not settled yet: ask again once it has")
    chain = bound_chain(doc.get("contract"), rpc_url or doc.get("rpc_url"))
    with chain_errors():
        onchain = bytes(chain.usage_root(int(doc.get("epoch", -1))))
    try:
        bodies = tuple(p.read_bytes() if p is not None else None for p in (request_body, response_body))
        billed = check_receipt(doc, request_id, onchain, bodies)
    except OSError as exc:
        fail(f"could not read your copy of a body: {exc}")
    except ReceiptRejected as exc:
        fail(f"INVALID: {exc}")
    checked = " and ".join(w for w, p in (("request", request_body), ("response", response_body)) if p)
    typer.echo(
        f"VALID: request {request_id} is in epoch {doc['epoch']}'s usage root on-chain ({chain.address}): "
        f"{billed['prompt_tokens']} prompt + {billed['completion_tokens']} completion tokens of "
        f"{billed['model']}, served by {billed['node_id']}"
        + (f"; your {checked} body matches it" if checked else "")
    )

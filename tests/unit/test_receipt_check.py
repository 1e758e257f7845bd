"""settlement/receipts.check_receipt on receipts built from real trees (no chain): both leaf layouts,
the client's own bodies, and malformed answers refused as INVALID, never a traceback."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from settlement.ledger_values import UsageRow
from settlement.receipts import ReceiptRejected, check_receipt
from settlement.trees import find_usage_leaf, usage_tree

OPERATOR = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
SENT, GOT = b'{"model":"default","prompt":"hi"}', b'{"id":"x","choices":[]}'


def _receipt(version: int) -> tuple[dict, bytes]:
    rows = tuple(
        UsageRow(
            f"r{i}",
            "n",
            OPERATOR,
            "default",
            3 + i,
            5,
            hashlib.sha256(SENT).hexdigest(),
            hashlib.sha256(GOT).hexdigest(),
        )
        for i in range(5)
    )
    tree = usage_tree(SimpleNamespace(epoch=4, rows=rows, leaf_version=version))
    i = find_usage_leaf(tree, "r2")
    doc = {
        "epoch": 4,
        "root": tree.root,
        "leafEncoding": list(tree.leaf_encoding),
        "value": tree.dump()["values"][i]["value"],
        "proof": tree.get_proof(i),
        "billed": {
            "model": "default",
            "node_id": "n",
            "operator": OPERATOR,
            "prompt_tokens": 5,
            "completion_tokens": 5,
            "request_hash": rows[2].request_hash,
            "response_hash": rows[2].response_hash,
        },
    }
    return doc, bytes.fromhex(tree.root[2:])


def test_a_version_2_receipt_checks_the_clients_own_bodies():
    doc, root = _receipt(2)
    assert check_receipt(doc, "r2", root, (SENT, GOT))["prompt_tokens"] == 5
    with pytest.raises(ReceiptRejected, match="your request body"):
        check_receipt(doc, "r2", root, (SENT + b" ", None))


def test_a_version_1_receipt_still_verifies_but_cannot_check_bodies():
    doc, root = _receipt(1)
    assert len(doc["value"]) == 7
    assert check_receipt(doc, "r2", root)["completion_tokens"] == 5
    with pytest.raises(ReceiptRejected, match="predate body hashes"):
        check_receipt(doc, "r2", root, (None, GOT))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: {**d, "value": [*d["value"][:-1], "0xnothex"]},
        lambda d: {**d, "value": d["value"][:5]},
        lambda d: {**d, "billed": {**d["billed"], "request_hash": "not hex"}},
        lambda d: {**d, "billed": None},
        lambda d: {k: v for k, v in d.items() if k != "proof"},
    ],
)
def test_a_malformed_receipt_is_rejected_not_a_crash(tamper):
    doc, root = _receipt(2)
    with pytest.raises(ReceiptRejected):
        check_receipt(tamper(doc), "r2", root)

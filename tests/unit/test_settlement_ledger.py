"""UsageLedger: durability settings, duplicates, epochs and late records, settlement state."""

import sqlite3

import pytest

from cluster import UsageRecord
from settlement.ledger import UsageLedger
from settlement.ledger_values import LedgerError, PendingTx
from settlement.rewards import NodeUsage

A = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
B = "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2"


def rec(rid, ended_at, node="n1", operator=A, status="ok", prompt=10, completion=20):
    return UsageRecord(
        request_id=rid,
        node_id=node,
        operator=operator,
        model="default",
        prompt_tokens=prompt,
        completion_tokens=completion,
        started_at=ended_at - 1.0,
        ended_at=ended_at,
        status=status,
    )


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(path):
    with UsageLedger(path, epoch_length_s=60.0, genesis=1000.0) as led:
        yield led


def test_wal_and_full_sync(ledger):
    conn = ledger._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_append_survives_reopen_and_assigns_epochs(ledger, path):
    res = ledger.append([rec("a", 1000.0), rec("b", 1059.999), rec("c", 1060.0), rec("d", 500.0)])
    assert (res.accepted, res.duplicates, res.late) == (4, (), 0)
    ledger.close()
    reopened = UsageLedger(path, 60.0, 1000.0)
    assert [r.request_id for r in reopened.records(0)] == ["a", "b", "d"]  # before genesis clamps to 0
    assert [r.request_id for r in reopened.records(1)] == ["c"]
    assert reopened.count() == 4
    reopened.close()


def test_a_restarted_usage_store_reads_its_predecessors_records(path):
    """Issue 13: the store's `all()` began at the epoch it was (re)started in and missed older records."""
    import asyncio

    from deploy.usage import UsageStore

    first = UsageStore(str(path), epoch_length_s=60.0, genesis=1000.0)
    asyncio.run(first.record([rec("old", 1001.0), rec("newer", 1130.0)]))
    restarted = UsageStore(str(path), epoch_length_s=60.0, genesis=1000.0)
    assert restarted._ledger.epochs_with_records() == [0, 2]
    assert [r.request_id for r in asyncio.run(restarted.all())] == ["old", "newer"]
    assert [r.request_id for r in asyncio.run(restarted.all(epoch=2))] == ["newer"]


def test_duplicates_rejected_and_reported_not_double_counted(ledger):
    ledger.append([rec("a", 1001.0), rec("b", 1001.0)])
    res = ledger.append([rec("b", 1002.0, prompt=999), rec("c", 1003.0), rec("c", 1004.0)])
    assert res.accepted == 1
    assert sorted(res.duplicates) == ["b", "c"]
    assert ledger.count() == 3
    assert ledger.usage_by_node(0) == {"n1": (NodeUsage(A, 30, 60),)}


def test_only_ok_records_count_as_usage(ledger):
    ledger.append(
        [
            rec("a", 1001.0),
            rec("b", 1001.0, status="error"),
            rec("c", 1001.0, status="cancelled"),
            rec("d", 1001.0, node="n2", operator=B, prompt=1, completion=2),
        ]
    )
    assert ledger.usage_by_node(0) == {"n1": (NodeUsage(A, 10, 20),), "n2": (NodeUsage(B, 1, 2),)}
    frozen = ledger.close_epoch(0)
    assert frozen.n_records == 4
    assert [r.request_id for r in frozen.rows] == ["a", "d"]
    assert frozen.usage_by_node() == ledger.usage_by_node(0)
    assert {r.status for r in ledger.records(0)} == {"ok", "error", "cancelled"}


def test_close_freezes_in_request_id_order_and_is_idempotent(ledger):
    ledger.append([rec(rid, 1010.0) for rid in ("z", "a", "m", "B")])
    frozen = ledger.close_epoch(0)
    assert [r.request_id for r in frozen.rows] == ["B", "a", "m", "z"]  # byte order
    assert ledger.close_epoch(0) == frozen
    assert ledger.frozen_epoch(0) == frozen
    assert ledger.last_closed_epoch() == 0
    assert (frozen.start, frozen.end) == (1000.0, 1060.0)


def test_epochs_close_strictly_in_order(ledger):
    with pytest.raises(LedgerError, match="next epoch to close is 0"):
        ledger.close_epoch(1)
    ledger.close_epoch(0)  # empty epochs close too
    with pytest.raises(LedgerError, match="next epoch to close is 1"):
        ledger.close_epoch(3)
    with pytest.raises(LedgerError, match="not closed yet"):
        ledger.frozen_epoch(1)


def test_late_records_go_to_next_open_epoch_and_leave_frozen_epoch_unchanged(ledger):
    ledger.append([rec("a", 1010.0)])
    frozen = ledger.close_epoch(0)
    res = ledger.append([rec("late", 1020.0), rec("ontime", 1070.0), rec("far", 1500.0)])
    assert (res.accepted, res.late) == (3, 1)
    assert ledger.frozen_epoch(0) == frozen
    assert [r.request_id for r in ledger.records(1)] == ["late", "ontime"]
    assert [r.request_id for r in ledger.records(8)] == ["far"]
    ledger.close_epoch(1)
    assert ledger.append([rec("later", 1010.0)]).late == 1
    assert [r.request_id for r in ledger.records(2)] == ["later"]


def test_altered_frozen_epoch_is_detected(ledger, path):
    ledger.append([rec("a", 1010.0), rec("b", 1010.0)])
    ledger.close_epoch(0)
    raw = sqlite3.connect(path)
    raw.execute("UPDATE records SET prompt_tokens = 1 WHERE request_id = 'a'")
    raw.commit()
    raw.close()
    with pytest.raises(LedgerError, match="altered"):
        ledger.frozen_epoch(0)


def test_node_with_two_operators_in_one_epoch_keeps_each_operators_part(ledger):
    # unregister + register under another operator within one epoch: grouped by (node, operator)
    ledger.append([rec("a", 1010.0, operator=B), rec("b", 1010.0, operator=A), rec("c", 1011.0, operator=B)])
    assert ledger.usage_by_node(0) == {"n1": (NodeUsage(A, 10, 20), NodeUsage(B, 20, 40))}
    assert ledger.close_epoch(0).usage_by_node() == ledger.usage_by_node(0)


def test_settlement_status_and_pending_tx(ledger, path):
    with pytest.raises(LedgerError, match="not closed"):
        ledger.mark_settled(0, "0xaa")
    ledger.close_epoch(0)
    assert ledger.settled(0) is None and ledger.pending_tx(0) is None
    ledger.put_pending_tx(0, b"\x01\x02", 7, "0xaa")
    ledger.put_pending_tx(0, b"\x03", 7, "0xbb")  # re-signed with bumped fees replaces it
    ledger.close()
    ledger = UsageLedger(path, 60.0, 1000.0)
    assert ledger.pending_tx(0) == PendingTx(b"\x03", 7, "0xbb")
    ledger.mark_settled(0, "0xbb")
    assert ledger.pending_tx(0) is None  # cleared in the same transaction
    assert ledger.settled(0) == "0xbb" and ledger.last_settled_epoch() == 0
    ledger.mark_settled(0, "0xbb")  # idempotent
    with pytest.raises(LedgerError, match="already settled"):
        ledger.mark_settled(0, "0xcc")
    ledger.put_pending_tx(0, b"x", 1, "0xdd")
    ledger.clear_pending_tx(0)
    assert ledger.pending_tx(0) is None
    ledger.close()


def test_rewards_are_read_from_the_reward_book_beside_the_ledger(ledger, path):
    from settlement.rewardbook import EpochCommitment, RewardBook, book_path_of

    assert ledger.rewards(0) is None  # no book yet
    book = RewardBook(book_path_of(path))
    root = b"\x01" * 32
    book.put(EpochCommitment(0, root, root, 0, 0, 100, {}, {}, {}))
    book.put(EpochCommitment(1, root, root, 2, 300, 0, {A: 150, B: 150}, {A: 150, B: 50}, {B: 100}))
    assert ledger.rewards(0) == ({}, 100)
    assert ledger.rewards(1) == ({A: 150, B: 50}, 0)  # operators' part; the validator's is in the book
    assert ledger.rewards(2) is None
    # The first commitment wins: a second, different one for the epoch is ignored.
    assert book.put(EpochCommitment(1, root, root, 2, 1, 0, {A: 1}, {A: 1}, {})).operator_rewards == {
        A: 150,
        B: 50,
    }


def test_a_pending_tx_remembers_the_block_it_was_first_seen_pending(ledger, path):
    ledger.close_epoch(0)
    ledger.put_pending_tx(0, b"x", 1, "0xaa")
    assert ledger.pending_since(0, "0xaa", 10) == 10
    assert ledger.pending_since(0, "0xaa", 15) == 10
    ledger.close()
    reopened = UsageLedger(path, 60.0, genesis=1000.0)
    assert reopened.pending_since(0, "0xaa", 30) == 10  # survives a restart
    assert reopened.pending_since(0, "0xbb", 30) == 30  # another tx: not this epoch's
    reopened.put_pending_tx(0, b"y", 1, "0xbb")  # a replacement starts its own count
    assert reopened.pending_since(0, "0xbb", 31) == 31
    reopened.close()


def test_changed_epoch_length_is_refused(ledger, path):
    ledger.append([rec("a", 1010.0)])
    with pytest.raises(LedgerError, match="epoch_length_s"):
        UsageLedger(path, epoch_length_s=30.0, genesis=1000.0)


def test_second_handle_on_same_file_sees_closes(ledger, path):
    other = UsageLedger(path, 60.0, 1000.0)
    other.close_epoch(0)
    assert ledger.append([rec("a", 1010.0)]).late == 1
    other.close()


def test_rejects_non_records(ledger):
    with pytest.raises(TypeError, match="UsageRecord"):
        ledger.append([{"request_id": "a"}])
    assert ledger.append([]).accepted == 0


@pytest.mark.parametrize("bad", [2**63, 2**24 + 1, -5])
def test_an_out_of_bounds_count_is_refused_alone_and_epoch_sums_stay_exact(ledger, bad):
    """Issue 10: one count >= 2^63 used to fail its whole batch (honest requests got 503) and an epoch
    sum >= 2^63 made SUM() overflow, stopping settlement for everyone."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        rec("x", 1010.0, prompt=bad)
    forged = rec("forged", 1010.0).model_copy(update={"prompt_tokens": bad})  # skips validation
    result = ledger.append([rec("a", 1010.0), forged, rec("b", 1011.0, completion=2**24)])
    assert result.accepted == 2 and result.rejected == ("forged",)
    ledger.close_epoch(0)
    assert ledger.usage_by_node(0) == {"n1": (NodeUsage(A, 20, 20 + 2**24),)}


def test_the_readme_audit_commands_read_a_ledgers_own_genesis(tmp_path):
    """Issue 14: `meritnet settlement status --ledger .meritnet/usage.db --epoch-length 60` failed on the
    demo's ledger ("created with genesis=1796191572.0, not 0.0"): audits now read it from the ledger."""
    import json as _json

    from typer.testing import CliRunner

    from deploy.cli import app

    path = tmp_path / "usage.db"
    genesis = 1796191572.0
    with UsageLedger(path, epoch_length_s=60.0, genesis=genesis) as led:
        led.append([rec("r1", genesis + 5), rec("r2", genesis + 7, node="n2", operator=B)])
        led.close_epoch(0)
    assert UsageLedger.stored_settings(path) == (60.0, genesis)
    runner = CliRunner()
    common = ["--ledger", str(path), "--epoch-length", "60"]
    r = runner.invoke(app, ["settlement", "status", *common])
    assert r.exit_code == 0 and _json.loads(r.output)["last_closed_epoch"] == 0, r.output
    out = tmp_path / "usage-0.json"
    r = runner.invoke(
        app, ["settlement", "export", "--epoch", "0", "--tree", "usage", "--out", str(out), *common]
    )
    assert r.exit_code == 0 and len(_json.loads(out.read_text())["values"]) == 2, r.output
    r = runner.invoke(app, ["settlement", "status", "--ledger", str(path), "--epoch-length", "30"])
    assert r.exit_code != 0 and "drop --epoch-length" in r.output


def test_records_keep_the_client_key_id_and_old_ledgers_gain_the_column(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)  # a ledger from before records carried key_id
    old.executescript(
        "CREATE TABLE records (request_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, node_id TEXT NOT NULL,"
        " operator TEXT NOT NULL, model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,"
        " completion_tokens INTEGER NOT NULL, started_at REAL NOT NULL, ttft_s REAL, ended_at REAL NOT NULL,"
        " status TEXT NOT NULL, request_hash TEXT NOT NULL, response_hash TEXT NOT NULL) WITHOUT ROWID;"
        f"INSERT INTO records VALUES ('old', 0, 'n1', '{A}', 'default', 1, 2, 1000, NULL, 1001, 'ok', '', '');"
    )
    old.commit()
    old.close()
    with UsageLedger(path, epoch_length_s=60.0, genesis=1000.0) as led:
        led.append([rec("new", 1010.0).model_copy(update={"key_id": "k-1234abcd"})])
        by_id = {r.request_id: r.key_id for r in led.records(0)}
    assert by_id == {"old": "", "new": "k-1234abcd"}


def test_an_epoch_closed_before_leaves_had_body_hashes_keeps_its_settled_root(path):
    """A ledger whose epochs table predates leaf versions (no column): its epochs rebuild the 7-field
    leaves their on-chain roots were posted with; epochs closed now get the 9-field leaves."""
    from settlement.merkle import StandardMerkleTree
    from settlement.trees import USAGE_LEAF_ENCODINGS, usage_leaf, usage_tree

    hashed = rec("r1", 1001.0).model_copy(update={"request_hash": "ab" * 32, "response_hash": "cd" * 32})
    with UsageLedger(path, epoch_length_s=60.0, genesis=1000.0) as led:
        led.append([hashed, rec("r2", 1070.0)])
        led.close_epoch(0)
    old_root = StandardMerkleTree.of([usage_leaf(hashed, 0, version=1)], USAGE_LEAF_ENCODINGS[1]).root
    conn = sqlite3.connect(path)  # as a ledger written before the column existed
    conn.execute("ALTER TABLE epochs DROP COLUMN leaf_version")
    conn.commit()
    conn.close()
    with UsageLedger(path, epoch_length_s=60.0, genesis=1000.0) as led:
        old = led.frozen_epoch(0)
        assert old.leaf_version == 1 and usage_tree(old).root == old_root
        new = led.close_epoch(1)
        assert new.leaf_version == 2 and list(usage_tree(new).leaf_encoding) == USAGE_LEAF_ENCODINGS[2]


def test_a_key_is_charged_every_counted_token_in_its_window(ledger):
    keyed = [
        rec(f"k{i}", t, status=s).model_copy(update={"key_id": "k-1"})
        for i, (t, s) in enumerate([(1001.0, "ok"), (1002.0, "error"), (1003.0, "cancelled"), (990.0, "ok")])
    ]
    ledger.append([*keyed, rec("other", 1001.0)])
    assert ledger.key_spent("k-1", since=1000.0) == 3 * 30  # not the one before the window, not another key's
    assert ledger.key_spent("k-2", since=0.0) == 0


@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "zz" * 32, "0x" + "ab" * 31])
def test_a_body_hash_is_64_lowercase_hex_or_nothing(bad):
    with pytest.raises(ValueError, match="request_hash"):
        rec("r", 1001.0).model_validate({**rec("r", 1001.0).model_dump(), "request_hash": bad})

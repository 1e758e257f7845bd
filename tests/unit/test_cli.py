"""The installed `meritnet` command, as a user runs it: --version and --help (no Ray, no imports of
the heavy parts: both return without starting anything)."""

from __future__ import annotations

import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

MERITNET = str(Path(sys.executable).parent / "meritnet")


def test_version_prints_the_installed_version():
    out = subprocess.run([MERITNET, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"meritnet {version('meritnet')}"


def test_help_lists_every_command_group():
    out = subprocess.run([MERITNET, "--help"], capture_output=True, text=True, timeout=60, check=True)
    for command in ("up", "status", "models", "node", "settlement", "keys"):
        assert f" {command} " in out.stdout, command


def test_bench_runs_the_chosen_benchmark_and_rewrites_only_its_block(tmp_path):
    results, md = tmp_path / "results", tmp_path / "RESULTS.md"
    md.write_text("# Results\nwritten by hand\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nafter\n")
    args = [
        "bench",
        "--quick",
        "--only",
        "settlement_offchain",
        "--results-dir",
        str(results),
        "--results-md",
        str(md),
    ]
    out = subprocess.run([MERITNET, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (results / "settlement_offchain.json").exists() and (results / "settlement_offchain.log").exists()
    text = md.read_text()
    assert "written by hand" in text and "after" in text and "old table" not in text
    assert "| `settlement_offchain` | ok |" in text

    wrong = subprocess.run([MERITNET, "bench", "--only", "nope"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "Unknown benchmark" in wrong.stdout


def test_every_meritnet_command_in_the_readme_exists_with_the_options_it_shows():
    """The README's `meritnet ...` lines (code spans and blocks) name real commands and options."""
    import re

    import typer.main

    from deploy.cli import app

    root = typer.main.get_command(app)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = re.findall(r"`(meritnet [^`]+)`", readme.replace("\n", " "))
    lines += re.findall(r"^\s*(meritnet [^\n#]+)", readme, flags=re.M)
    checked = 0
    for line in lines:
        command, words = root, line.split()[1:]
        while words and words[0] in getattr(command, "commands", {}):
            command = command.commands[words.pop(0)]
        if command is root:
            continue  # prose such as "meritnet adds routing"
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        shown = {w.split("=")[0] for w in words if w.startswith("--")}
        assert shown <= known | {"--help"}, (line, sorted(shown - known))
        checked += 1
    assert checked >= 10, lines


def test_keys_create_with_a_budget_and_list_shows_its_billed_spend(tmp_path):
    """The README's key commands as a user types them; the spend comes from the network's ledger."""
    from cluster.records import UsageRecord
    from routing.keys import KEYS_FILE, KeyStore
    from settlement import UsageLedger

    def run(*args):
        return subprocess.run(
            [MERITNET, "keys", *args, "--state-dir", str(tmp_path)], capture_output=True, text=True
        )

    done = run("create", "--budget-tokens", "1000", "--budget-period", "day")
    assert done.returncode == 0, done.stderr
    (key,) = KeyStore(tmp_path / KEYS_FILE).load()
    assert (key.budget_tokens, key.budget_period) == (1000, "day")
    with UsageLedger(tmp_path / "usage.db", epoch_length_s=60.0) as ledger:
        now = time.time()
        ledger.append(
            [
                UsageRecord(
                    request_id=f"r{i}",
                    node_id="n",
                    operator="0x" + "1" * 40,
                    model="default",
                    prompt_tokens=10,
                    completion_tokens=20,
                    started_at=now - 1,
                    ended_at=now,
                    status=status,
                    key_id=key.key_id,
                )
                for i, status in enumerate(("ok", "ok", "error"))
            ]
        )
    listed = run("list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if key.key_id in line)
    assert "1000/day" in row and " 90 " in row  # three requests of 30 counted: a failed one's too
    bad = run("create", "--budget-tokens", "10", "--budget-period", "fortnight")
    assert bad.returncode == 2 and "day, week, month" in bad.stderr

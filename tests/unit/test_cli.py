"""The installed `meritnet` command, as a user runs it: --version and --help (no Ray, no imports of
the heavy parts: both return without starting anything)."""

from __future__ import annotations

import subprocess
import sys
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

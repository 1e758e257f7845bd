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

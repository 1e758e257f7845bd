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

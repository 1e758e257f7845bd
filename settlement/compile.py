"""Compile the distributor contract and write its committed artifact.

`python -m settlement.compile` regenerates `settlement/contracts/MeritDistributor.json`; a test
recompiles and compares, so the committed bytecode always matches the committed source. The
compiler is the `vyper` package pinned in pyproject.toml (no compiler binary is downloaded).

Vyper 0.4 has no `error` declarations, so the contract raises Solidity-ABI custom errors with
`raw_revert(concat(method_id("Name(types)"), abi_encode(...)))`. Those signatures are read from the
sources here and added to the artifact's ABI as `"type": "error"` entries, so web3 and other
standard tools decode the revert data by name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import Any

CONTRACTS_DIR = Path(__file__).parent / "contracts"
MAIN_SOURCE = "MeritDistributor.vy"
ARTIFACT_PATH = CONTRACTS_DIR / "MeritDistributor.json"

# Fixed so the bytecode is reproducible: "prague" is both py-evm's (eth-tester) and vyper 0.4.3's
# default fork, and anvil runs it too.
EVM_VERSION = "prague"
OPTIMIZE = "gas"

_ERROR_SIG = re.compile(r'method_id\("([A-Za-z_][A-Za-z0-9_]*)\(([a-z0-9,\[\]]*)\)"\)')


def _sources() -> list[Path]:
    return sorted(CONTRACTS_DIR.glob("*.vy"))


def _error_abi(sources: list[Path]) -> list[dict[str, Any]]:
    """ABI entries for every custom error the sources raise (deduplicated, sorted by name)."""
    errors: dict[str, list[str]] = {}
    for path in sources:
        for name, types in _ERROR_SIG.findall(path.read_text()):
            errors[name] = [t for t in types.split(",") if t]
    return [
        {
            "type": "error",
            "name": name,
            "inputs": [{"name": f"arg{i}", "type": t} for i, t in enumerate(types)],
        }
        for name, types in sorted(errors.items())
    ]


def compile_artifact() -> dict[str, Any]:
    """Compile the sources in settlement/contracts/ and return the artifact (pure: writes nothing)."""
    import vyper
    from vyper.compiler import compile_from_file_input
    from vyper.compiler.input_bundle import FilesystemInputBundle
    from vyper.compiler.settings import OptimizationLevel, Settings

    bundle = FilesystemInputBundle([CONTRACTS_DIR])
    settings = Settings(optimize=OptimizationLevel.from_string(OPTIMIZE), evm_version=EVM_VERSION)
    out = compile_from_file_input(
        bundle.load_file(CONTRACTS_DIR / MAIN_SOURCE),
        input_bundle=bundle,
        settings=settings,
        output_formats=["abi", "bytecode", "bytecode_runtime"],
    )
    sources = _sources()
    return {
        "contract": MAIN_SOURCE.removesuffix(".vy"),
        "compiler": f"vyper-{vyper.__version__}",
        "settings": {"optimize": OPTIMIZE, "evm_version": EVM_VERSION},
        "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources},
        "abi": out["abi"] + _error_abi(sources),
        "bytecode": out["bytecode"],
        "bytecode_runtime": out["bytecode_runtime"],
    }


def load_artifact(path: Path = ARTIFACT_PATH) -> dict[str, Any]:
    """The committed artifact (what the chain client deploys and talks to)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m settlement.compile` to build it")
    return json.loads(path.read_text())


def write_artifact(path: Path = ARTIFACT_PATH) -> dict[str, Any]:
    artifact = compile_artifact()
    path.write_text(json.dumps(artifact, indent=2, sort_keys=True) + "\n")
    return artifact


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile the meritnet distributor and write its artifact.")
    parser.add_argument(
        "--out", type=Path, default=ARTIFACT_PATH, help="artifact path (default: committed one)"
    )
    args = parser.parse_args(argv)
    artifact = write_artifact(args.out)
    print(
        f"wrote {args.out} ({artifact['compiler']}, {len(artifact['bytecode']) // 2 - 1} bytes of initcode)"
    )


if __name__ == "__main__":
    main()

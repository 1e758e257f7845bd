"""`meritnet bench`: run every benchmark (or some), keep their JSON under benchmarks/results/, draw the
gateway's latency plot, and rewrite the generated block of benchmarks/RESULTS.md (between the
`<!-- bench:begin -->` and `<!-- bench:end -->` markers) with a table of what ran and its headline
figures. Each benchmark runs as its own process (`python -m benchmarks.<name>`), exactly as the README
shows it, with its log beside its JSON; one that fails is reported and the others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (arguments of a --quick run, of a full run); in the order they run (cheap first).
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "router": (["--quick"], []),
    "fleet": (["--quick"], []),
    "settlement_offchain": (["--quick"], []),
    "settlement": (["--quick"], []),
    "verification": (["--quick"], []),
    "gateway": (["--quick"], []),
    "node_hop": (["--requests", "40", "--rounds", "1"], []),
    "load": (["--streams", "32", "--seconds", "20"], []),
    "idle": (["--settle", "20", "--window", "20"], []),
    "profile": (["--seconds", "10"], []),
}

console = Console()
_ONLY_HELP = f"Run only these (repeatable): {', '.join(BENCHMARKS)}."


def bench(
    quick: bool = typer.Option(False, "--quick", help="Shorter runs with the same JSON keys."),
    only: list[str] = typer.Option([], "--only", help=_ONLY_HELP),
    results_dir: Path = typer.Option(ROOT / "benchmarks" / "results", help="Where the JSON and logs go."),
    results_md: Path = typer.Option(
        ROOT / "benchmarks" / "RESULTS.md", help="Markdown whose bench block to rewrite."
    ),
) -> None:
    """Run the benchmarks and refresh their results, plots and the generated table in RESULTS.md."""
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        console.print(f"[red]Unknown benchmark(s) {unknown}[/red]; choose from {', '.join(BENCHMARKS)}.")
        raise typer.Exit(2)
    names = [n for n in BENCHMARKS if not only or n in only]
    results_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as bar:
        for name in names:
            task = bar.add_task(f"benchmarks.{name}", total=1)
            rows.append(_run(name, quick, results_dir))
            bar.update(task, completed=1, description=f"benchmarks.{name}: {rows[-1]['status']}")
    if "gateway" in names and (results_dir / "gateway.json").exists():
        _run_plot(results_dir)
    _rewrite_block(results_md, _table(rows, quick, results_dir, results_md))
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    console.print(f"Results in {results_dir}; table in {results_md}.")
    if failed:
        console.print(f"[red]Failed: {', '.join(failed)}[/red] (see their .log files)")
        raise typer.Exit(1)


def _run(name: str, quick: bool, results_dir: Path) -> dict:
    quick_args, full_args = BENCHMARKS[name]
    out, log = results_dir / f"{name}.json", results_dir / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        f"benchmarks.{name}",
        "--out",
        str(out),
        *(quick_args if quick else full_args),
    ]
    t0 = time.monotonic()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    ok = rc == 0 and out.exists()
    return {
        "name": name,
        "status": "ok" if ok else f"failed (exit {rc})",
        "seconds": time.monotonic() - t0,
        "headline": _headline(json.loads(out.read_text())) if ok else {},
    }


def _run_plot(results_dir: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.plot_gateway", str(results_dir / "gateway.json")]
    subprocess.run([*cmd, "--out", str(results_dir / "gateway-latency.png")], cwd=ROOT, capture_output=True)


def _headline(data: dict, limit: int = 8) -> dict[str, float]:
    """The figures a reader looks at first: top-level numbers, and the numbers of `ratio_vs_bare` /
    `ratio` / `summary` mappings (first `limit`)."""
    found: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = value
        elif key in ("ratio_vs_bare", "ratio", "summary") and isinstance(value, dict):
            found.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, int | float)})
    return dict(list(found.items())[:limit])


def _table(rows: list[dict], quick: bool, results_dir: Path, results_md: Path) -> str:
    where = Path(results_dir).resolve()
    try:
        shown = where.relative_to(results_md.resolve().parent)
    except ValueError:
        shown = where
    lines = [
        f"Generated by `meritnet bench{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"JSON and logs in `{shown}/`.",
        "",
        "| benchmark | status | time | headline figures |",
        "|---|---|---|---|",
    ]
    for r in rows:
        figures = ", ".join(f"{k} {v:.3g}" for k, v in r["headline"].items()) or "-"
        lines.append(f"| `{r['name']}` | {r['status']} | {r['seconds']:.0f} s | {figures} |")
    for png in sorted(Path(results_dir).glob("*.png")):  # the gateway's CDFs, the fleet's plot
        lines += ["", f"![{png.stem}]({shown}/{png.name})"]
    return "\n".join(lines)


def _rewrite_block(md: Path, block: str) -> None:
    text = md.read_text() if md.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + block + "\n" + END + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## Latest `meritnet bench`\n\n{BEGIN}\n{block}\n{END}\n"
    md.write_text(text)

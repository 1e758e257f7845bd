"""Plot end-to-end latency over time per policy from one or more `benchmarks.fleet` JSON files.

    python -m benchmarks.plot_fleet --out fleet-latency.png fleet-default.json fleet-harsh.json ...

One panel per JSON file (one scenario each): p50 (solid) and p99 (dashed) of the requests
arriving in each 30 s bucket after the warm-up, log scale. Reads the `timeline` key that
benchmarks.fleet writes per policy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {
    "meritnet": ("tab:blue", 2.2),
    "oracle-least-loaded": ("black", 1.4),
    "oracle-power-of-two": ("tab:gray", 1.0),
    "least-loaded": ("tab:orange", 1.0),
    "power-of-two": ("tab:red", 1.0),
    "round-robin": ("tab:purple", 1.0),
    "random": ("tab:brown", 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("results", nargs="+", help="benchmarks.fleet JSON files")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.results), figsize=(6 * len(args.results), 4.2), squeeze=False)
    for ax, path in zip(axes[0], args.results):
        doc = json.loads(Path(path).read_text())
        for name, r in doc["policies"].items():
            rows = [row for row in r.get("timeline", []) if row[1] is not None]
            if not rows:
                continue
            color, width = STYLE.get(name, (None, 1.0))
            t = [row[0] for row in rows]
            ax.plot(t, [row[1] / 1000 for row in rows], color=color, lw=width, label=f"{name} p50")
            ax.plot(t, [row[2] / 1000 for row in rows], color=color, lw=width, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("arrival time (s); dashed = p99")
        ax.set_ylabel("end-to-end latency (s, log)")
        ax.set_title(f"{Path(doc['scenario']).stem} ({doc['duration_s']:.0f} s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


if __name__ == "__main__":
    main()

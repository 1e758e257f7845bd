"""Plot `benchmarks.gateway`'s TTFT and inter-token gap distributions, one panel per concurrency.

    python -m benchmarks.plot_gateway FILE.json --out benchmarks/gateway-latency.png

Empirical CDFs for the three stacks (meritnet, stock ray.serve.llm, bare vLLM): the further left,
the better; a long flat step in the gap panel is tokens arriving in clumps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/gateway-latency.png"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = json.loads(args.results.read_text())["samples"]
    levels = list(next(iter(samples.values())))
    fig, axes = plt.subplots(2, len(levels), figsize=(5 * len(levels), 8))
    for col, level in enumerate(levels):
        for row, (key, label) in enumerate((("ttft_ms", "TTFT (ms)"), ("itl_ms", "inter-token gap (ms)"))):
            ax = axes[row][col]
            for stack, by_level in samples.items():
                values = sorted(by_level[level][key])
                if values:
                    ax.step(
                        values, [(i + 1) / len(values) for i in range(len(values))], label=stack, where="post"
                    )
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlabel(label)
            ax.set_ylabel("fraction of samples")
            ax.set_title(f"{level}: {label}")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Embeddings verification (issue 30): how far honest engines' vectors drift from the validator's
reference, and how far cheaters' fall, as cosine similarity; the thresholds in scoring/embeddings.py
come from here.

    python -m benchmarks.embeddings --out FILE.json [--inputs N]

Every engine is vLLM running the built default model as a pooling model (as embeddings nodes run it).
The reference is fp32 with 2 OpenMP threads; honest cells differ from it in dtype (bf16), threads (1),
batch (all inputs at once vs one at a time) and, on an AVX-512 CPU, ATen held to AVX2. Cheats: another
seed of the model (substitution), its weights with 5% noise, and RTN int8 / int4 quantisations. For each
cell: cosine to the reference per input (min, p01, mean), and the share of vectors that would violate
(< min_cosine) or be fraud (< fraud_cosine) at a sweep of thresholds (the ROC). Each engine is started
and stopped in turn (about 25 s each on a 2-core machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from benchmarks.machine import machine
from benchmarks.verification import _paragraph_halves, _progress, cpu_engine, perturbed_model

MIN_COSINES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)


def _embed(model_dir: Path, texts: list[str], batch: int, **engine) -> list[list[float]]:
    """Vectors of `texts` from a fresh pooling engine of `model_dir`, `batch` inputs per call."""
    from cluster.deployment import EMBED_ENGINE_KWARGS

    llm = cpu_engine(model_dir, **engine, engine_kwargs=EMBED_ENGINE_KWARGS)
    try:
        out: list[list[float]] = []
        for i in range(0, len(texts), batch):
            out += [list(o.outputs.embedding) for o in llm.embed(texts[i : i + batch], use_tqdm=False)]
        return out
    finally:
        del llm
        gc.collect()


def _cell(name: str, vectors: list[list[float]], reference: list[list[float]], config: dict) -> dict:
    import numpy as np

    from scoring.embeddings import EmbeddingThresholds, cosine

    sims = np.array([cosine(a, b) for a, b in zip(vectors, reference, strict=True)])
    th = EmbeddingThresholds()
    return {
        "name": name,
        "config": config,
        "inputs": len(sims),
        "cosine_min": float(sims.min()),
        "cosine_p01": float(np.quantile(sims, 0.01)),
        "cosine_mean": float(sims.mean()),
        "violation_rate": float((sims < th.min_cosine).mean()),
        "fraud_rate": float((sims < th.fraud_cosine).mean()),
        "violation_rate_at": {str(t): float((sims < t).mean()) for t in MIN_COSINES},
    }


def run(inputs: int) -> dict:
    from cluster.model import build_default_model
    from cluster.quantize import quantized_model

    con = _progress()
    t0 = time.time()
    texts = [p[:600] for p in _paragraph_halves()[0][:inputs]]
    d0, d1 = build_default_model(0), build_default_model(1)
    con.log(f"reference: fp32, 2 threads, {len(texts)} inputs")
    reference = _embed(d0, texts, 16, dtype="float32", threads=2)
    honest = [
        ("fp32, 1 thread, one at a time", d0, 1, {"dtype": "float32", "threads": 1}),
        ("bf16, 1 thread, one at a time", d0, 1, {"dtype": "bfloat16", "threads": 1}),
        ("bf16, 1 thread, 16 at a time", d0, 16, {"dtype": "bfloat16", "threads": 1}),
    ]
    if "avx512f" in machine()["isa"]:
        honest.append(
            ("bf16, ATen AVX2, 16 at a time", d0, 16, {"dtype": "bfloat16", "threads": 1, "isa": "avx2"})
        )
    cheats = [
        ("substitution (seed 1)", d1, 16, {"dtype": "bfloat16", "threads": 1}),
        (
            "perturbed weights (5%)",
            perturbed_model(d0, rel_std=0.05),
            16,
            {"dtype": "bfloat16", "threads": 1},
        ),
        ("int8 RTN per channel", quantized_model(d0, "int8"), 16, {"dtype": "bfloat16", "threads": 1}),
        ("int4 RTN groups of 32", quantized_model(d0, "int4", 32), 16, {"dtype": "bfloat16", "threads": 1}),
    ]
    out: dict[str, list] = {"honest": [], "cheats": []}
    for kind, cells in (("honest", honest), ("cheats", cheats)):
        for name, model_dir, batch, engine in cells:
            con.log(f"{kind}: {name}")
            vectors = _embed(model_dir, texts, batch, **engine)
            out[kind].append(_cell(name, vectors, reference, {**engine, "batch": batch}))
            con.log(json.dumps(out[kind][-1]["cosine_min"]))
    return {
        **out,
        "reference": {"dtype": "float32", "threads": 2, "batch": 16},
        "worst_honest_cosine": min(c["cosine_min"] for c in out["honest"]),
        "best_cheat_cosine_mean": max(c["cosine_mean"] for c in out["cheats"]),
        "wall_seconds": time.time() - t0,
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="Where to write the JSON results.")
    ap.add_argument("--inputs", type=int, default=500, help="Texts embedded by every engine.")
    args = ap.parse_args()
    res = run(args.inputs)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("worst_honest_cosine", "best_cheat_cosine_mean", "wall_seconds")}))


if __name__ == "__main__":
    main()

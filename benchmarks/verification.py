"""Verification benchmark: how fast validators catch each attack, and that honest nodes never fail.

    python -m benchmarks.verification --out FILE.json [--quick]

Real parts: the default model (seed 0) in a real vLLM CPU engine, which serves the honest nodes (at
several batch sizes, to expose batching nondeterminism; greedy, and seeded sampled at T 0.7/0.8/1.0) and,
teacher-forced, is the validator's reference. Attackers: the seed-1 model (substitution) and seed-0
weights plus Gaussian noise (perturbed) run through transformers (greedy); int8 / int4 round-to-nearest
quantizations of the seed-0 model (cluster.quantize) and the seed-1 model at temperature 0.8
(substitution_sampled) are served by their own vLLM engines, answering challenges drawn as validators
draw them (greedy and seeded sampled, verified by replay of the sampler: scoring.replay). Truncation
and inflation are honest vLLM outputs with lying metadata; the slow node is honest output with 4x the
latency. challenge_distinguishability_auc: classifiers over what a node sees (see `distinguishability`).

Honest heterogeneity (issue 26, `hetero`): honest nodes whose engine DIFFERS from the reference (fp32, 2
OpenMP threads, prefix caching): bf16 vs fp32, 1 vs 2 threads, prefix caching off, batch 1 vs 8 (cells
of `hetero.cells[]`, each with false_fail_rate / false_fraud_rate on held-out completions). Thresholds
are calibrated (`scoring.thresholds.calibrate`, margin 2) on the first half of every cell from the measured
token margins and margin noise (node logprobs vs reference logprobs); the second half is judged.
`false_conviction_bound` states the bound and its assumption and simulates epochs of honest evidence.

Per attack and trial, a fresh validator score state challenges the attacker until the sequential test
convicts it (integrity 0; speed < 0.5 for the slow node), at most `--max-challenges`; detect_rate is
the share of trials caught. near_tie_flipper runs the right model but takes the runner-up wherever the
top two are within 0.9 x margin_tol (what the tolerance lets a cheat steer). `roc`: for the int8 and
int4 nodes, detection within max-challenges vs the simulated false-conviction rate per epoch as
margin_tol moves. validator_overhead = challenge tokens / organic tokens for 3 validators at the
default challenge rate against a node serving `--organic-rps` requests/s of the same size: the load
validators add to the nodes. Shadow verification adds no node load; its cost is reference prefill on
the validators' own engines, reported as shadow_reference_ratio (3 validators x the gateway's default
shadow_rate of the organic tokens).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

from benchmarks.machine import machine

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _progress():
    from rich.console import Console

    return Console(stderr=True)


def perturbed_model(src: Path, rel_std: float, seed: int = 7) -> Path:
    """seed-0 weights + N(0, (rel_std * std(W))^2) noise per tensor, saved beside the source (cached)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = src.with_name(src.name + f"-noise{rel_std:g}")
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))
    noisy = {
        k: (t + torch.randn(t.shape, generator=gen) * rel_std * t.float().std()).to(t.dtype).contiguous()
        if not k.endswith("norm.weight")
        else t
        for k, t in sorted(tensors.items())
    }
    save_file(noisy, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    return out


class HFGenerator:
    """Greedy generation with transformers (attackers' engines)."""

    def __init__(self, model_dir: Path, eos: frozenset[int]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        self.eos = sorted(eos)

    def generate(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        import torch

        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.eos[0],
            )
        ids = out[0][len(prompt_ids) :].tolist()
        finish = "stop" if ids and ids[-1] in self.eos else "length"
        return ids, finish


def vllm_generate(llm, prompts: list[list[int]], max_tokens: list[int]) -> list[tuple[list[int], str, str]]:
    """One batched greedy call: (token ids, finish_reason, text) per prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, o.outputs[0].text) for o in outs]


def challenge_prompts(codec, n: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) drawn exactly as validators draw challenges."""
    from scoring.challenge import ChallengeConfig, ChallengePool

    pool = ChallengePool(ChallengeConfig(), random.Random(seed))
    out = []
    for _ in range(n):
        r = pool.sample("n", "default")
        ids = codec.encode_chat(list(r.messages)) if r.messages else codec.encode_prompt(r.prompt)
        out.append((ids, r.max_tokens))
    return out


def challenge_requests(codec, n: int, seed: int, temperature: float | None = None):
    """(prompt ids, max_tokens, temperature, seed) drawn as validators draw challenges (the prior mix:
    greedy and sampled); `temperature` overrides the drawn one."""
    from scoring.challenge import ChallengeConfig, ChallengePool

    pool = ChallengePool(ChallengeConfig(), random.Random(seed))
    out = []
    for _ in range(n):
        r = pool.sample("n", "default")
        ids = codec.encode_chat(list(r.messages)) if r.messages else codec.encode_prompt(r.prompt)
        t = r.temperature if temperature is None else temperature
        out.append((ids, r.max_tokens, t, int(r.body["seed"])))
    return out


def vllm_claims(
    llm, reqs, batch_sizes=(16,), node_logprobs: list | None = None, json_schema: str | None = None
) -> list:
    """Claims of what `llm` returns for each request (seeded), in batches of the given sizes in turn.
    `node_logprobs`: a list that receives, per claim, the node's own top-5 (+ emitted) logprobs per
    position (raw logits, as the reference's), to measure honest float noise directly. `json_schema`:
    every request is decoded under that schema (response_format json_schema; the engine needs the
    network's structured_outputs_config, cluster.deployment.EngineDefaults)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from scoring.verify import Claim

    claims, i, k = [], 0, 0
    while i < len(reqs):
        chunk = reqs[i : i + batch_sizes[k % len(batch_sizes)]]
        lp = 5 if node_logprobs is not None else None
        structured = None if json_schema is None else StructuredOutputsParams(json=json_schema)
        params = [
            SamplingParams(max_tokens=m, temperature=t, seed=s, logprobs=lp, structured_outputs=structured)
            for _, m, t, s in chunk
        ]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, *_ in chunk], params, use_tqdm=False)
        for (p, m, t, s), o in zip(chunk, outs):
            out = o.outputs[0]
            if node_logprobs is not None:
                node_logprobs.append(
                    [{int(k): float(v.logprob) for k, v in pos.items()} for pos in (out.logprobs or [])]
                )
            claims.append(
                Claim(
                    prompt_token_ids=tuple(p),
                    text=out.text,
                    completion_token_ids=tuple(out.token_ids),
                    reported_completion_tokens=len(out.token_ids),
                    finish_reason=out.finish_reason,
                    max_tokens=m,
                    temperature=t,
                    seed=s,
                    json_schema=json_schema,
                )
            )
        i += len(chunk)
        k += 1
    return claims


def engine_attack_claims(model_dir: Path, codec, trials: int, per_trial: int, temperature=None):
    """Per trial, `per_trial` challenge claims answered by a real vLLM engine serving `model_dir`."""
    import gc

    from vllm import LLM

    # A token budget no batch of 16 can exceed: vLLM 0.32's CPU runner crashes ("CPU Generator does not
    # use offset") when a seeded sampled request's prefill is chunked.
    llm = LLM(model=str(model_dir), max_model_len=1024, max_logprobs=20, seed=0, max_num_batched_tokens=16384)
    reqs = [challenge_requests(codec, per_trial, 1000 + t, temperature) for t in range(trials)]
    flat = vllm_claims(llm, [r for rs in reqs for r in rs])
    del llm
    gc.collect()
    return [flat[t * per_trial : (t + 1) * per_trial] for t in range(trials)]


def honest_completions(llm, codec, n: int, batch_sizes=(1, 4, 16), seed: int = 0):
    """Greedy completions of n challenge prompts, spread over the given batch sizes."""
    from scoring.verify import Claim

    prompts = challenge_prompts(codec, n, seed)
    claims = []
    i = 0
    while i < len(prompts):
        bs = batch_sizes[(i // max(batch_sizes)) % len(batch_sizes)]
        chunk = prompts[i : i + bs]
        for (p, m), (ids, finish, text) in zip(
            chunk, vllm_generate(llm, [c[0] for c in chunk], [c[1] for c in chunk])
        ):
            claims.append(
                Claim(
                    prompt_token_ids=tuple(p),
                    text=text,
                    completion_token_ids=tuple(ids),
                    reported_completion_tokens=len(ids),
                    finish_reason=finish,
                    max_tokens=m,
                )
            )
        i += bs
    return claims


def _claim_from(gen, codec, prompt, max_tokens):
    from scoring.verify import Claim

    ids, finish = gen.generate(prompt, max_tokens)
    return Claim(
        prompt_token_ids=tuple(prompt),
        text=codec.decode([t for t in ids if t not in codec.eos_token_ids]),
        completion_token_ids=tuple(ids),
        reported_completion_tokens=len(ids),
        finish_reason=finish,
        max_tokens=max_tokens,
    )


# ---- honest heterogeneity (issue 26) ---------------------------------------------------------------
#
# Honest nodes whose engine differs from the validator's reference: dtype (bf16 vs fp32), OpenMP
# threads (1 vs 2), batch size (1 vs 8), prefix caching (off vs on). Every cell is honest: whatever it
# fails is a false positive. Each node configuration is its own vLLM engine, started and stopped in turn.

REFERENCE_CONFIG = {"dtype": "float32", "threads": 2, "prefix_caching": True}
HETERO_NODES_QUICK = (
    {"dtype": "float32", "threads": 1, "prefix_caching": False},
    {"dtype": "bfloat16", "threads": 1, "prefix_caching": False},
)
HETERO_NODES_FULL = (
    *HETERO_NODES_QUICK,
    {"dtype": "bfloat16", "threads": 2, "prefix_caching": True},
    {"dtype": "float32", "threads": 2, "prefix_caching": True},  # the reference's own engine: batch only
)
# On a CPU with AVX-512, one more honest node: ATen held down to AVX2 (the ISA cell; vLLM's own kernels
# and oneDNN still pick by the CPU's flags). Elsewhere the cell would equal the bf16 one, so it is left out.
ISA_NODE = {"dtype": "bfloat16", "threads": 1, "prefix_caching": False, "isa": "avx2"}
HETERO_BATCHES = (1, 8)
FLIPPER_MAX_TOKENS = 96  # its python decode loop takes ~15 s per 512-token answer on a loaded 2-core box
ROC_TOLS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def cpu_engine(
    model_dir: Path,
    dtype: str = "float32",
    threads: int = 2,
    prefix_caching: bool = True,
    isa: str | None = None,
    engine_kwargs: dict | None = None,
):
    """A vLLM CPU engine with `threads` OpenMP threads (the engine's worker binds cores 0..threads-1);
    `isa` ("avx2") holds ATen's kernels down to that instruction set; `engine_kwargs` adds to vLLM's
    arguments (a pooling model: benchmarks.embeddings)."""
    from vllm import LLM

    env = {"VLLM_CPU_OMP_THREADS_BIND": "0" if threads == 1 else f"0-{threads - 1}"}
    if isa is not None:
        # ATen only: capping oneDNN too (ONEDNN_MAX_CPU_ISA=AVX2) aborts a bf16 engine on an AMX CPU,
        # because vLLM picks its AMX brgemm linear kernel by the CPU's flags ("BFloat16 Brgemm VNNI format
        # is only supported ... when oneDNN ukernel is enabled and `amx` is supported"; RESULTS.md).
        env |= {"ATEN_CPU_CAPABILITY": isa}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the engine's processes start now and inherit these
    try:
        return LLM(
            model=str(model_dir),
            max_model_len=1024,
            max_logprobs=20,
            seed=0,
            dtype=dtype,
            enable_prefix_caching=prefix_caching,
            max_num_batched_tokens=16384,  # see engine_attack_claims: no chunked seeded prefill
            **(engine_kwargs or {}),
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def hetero_requests(codec, n: int, seed: int):
    """n challenge requests, alternately greedy and seeded sampled at T 0.7/0.8/1.0."""
    rng = random.Random(seed)
    return [
        (p, m, 0.0 if i % 2 == 0 else rng.choice((0.7, 0.8, 1.0)), s)
        for i, (p, m, _, s) in enumerate(challenge_requests(codec, n, seed))
    ]


def hetero_node_claims(model_dir: Path, codec, configs, per_cell: int, seed: int = 21) -> list[dict]:
    """Per (node configuration, batch size): honest claims from that engine (one engine per config)."""
    import gc

    cells = []
    for cfg in configs:
        llm = cpu_engine(model_dir, **cfg)
        for batch in HETERO_BATCHES:
            reqs = hetero_requests(codec, per_cell, seed + batch)
            node_lps: list = []
            claims = vllm_claims(llm, reqs, (batch,), node_logprobs=node_lps)
            cells.append({"node": {**cfg, "batch": batch}, "claims": claims, "node_logprobs": node_lps})
        del llm
        gc.collect()
    return cells


def margin_noise(node_lps: list[dict[int, float]], ref_lps: list[dict[int, float]]) -> list[float]:
    """Honest float noise, measured directly: per position, the largest change between reference and
    node of a margin lp(top-1) - lp(b), over the tokens b both report within 5 nats of the reference's
    top-1 (nats; the ones float noise could make win). A flip needs a margin below it."""
    out = []
    for n, r in zip(node_lps, ref_lps):
        top = max(r, key=r.get) if r else None
        if top not in n:
            continue
        d = [abs((n[top] - n[b]) - (r[top] - r[b])) for b in n if b in r and b != top and r[top] - r[b] <= 5]
        if d:
            out.append(max(d))
    return out


def claim_margins(claims, ref, vocab_size: int, sampler, lps=None) -> list[list[float]]:
    """Per claim, each token's margin under the reference (greedy: TokenCheck.margin; seeded sampled:
    scoring.replay.replay_margins, in logit units). `lps`: the reference's logprobs, if already known."""
    from scoring.replay import replay_margins
    from scoring.verify import compare_tokens

    if lps is None:
        lps = ref.prompt_logprobs_many([(c.prompt_token_ids, c.completion_token_ids) for c in claims], 20)
    out = []
    for c, lp in zip(claims, lps):
        ids = list(c.completion_token_ids)
        if c.temperature == 0.0:
            out.append([t.margin for t in compare_tokens(ids, lp, 20)])
        else:
            out.append(replay_margins(lp, ids, c.temperature, c.seed, vocab_size, sampler))
    return out


def evidence_at(margins: list[float], th):
    """The Evidence one completion with these token margins gives at th (structure assumed honest)."""
    from scoring.verify import Evidence, binomial_tail

    n, v = len(margins), sum(m > th.margin_tol for m in margins)
    fraud = v > th.fraud_rate * n and v > 0 and binomial_tail(n, v, th.honest_rate) < th.fraud_alpha
    return Evidence(n, v, th.llr(n, v), fraud)


def simulated_false_conviction(pool: list[list[float]], th, score_config, epochs: int, seed: int) -> float:
    """Share of simulated epochs in which an honest node is convicted: each epoch, the CUSUM over
    max_completions_per_epoch completions drawn (with replacement) from the measured honest pool,
    judged at th (S_n = W_n - min(0, min_k W_k), W the running sum of LLRs)."""
    import numpy as np

    ev = [evidence_at(m, th) for m in pool]
    llr = np.array([e.llr for e in ev])
    fraud = np.array([e.fraud for e in ev])
    rng = np.random.default_rng(seed)
    a, caught = score_config.threshold, 0
    for _ in range(epochs):
        idx = rng.integers(0, len(ev), score_config.max_completions_per_epoch)
        w = np.cumsum(llr[idx])
        s = w - np.minimum(0.0, np.minimum.accumulate(w))
        caught += bool(fraud[idx].any() or (s >= a).any())
    return caught / epochs


def hetero_section(cells, ref, codec, sampler, score_config, margin: float = 2.0) -> tuple[dict, object]:
    """Calibrate on the first half of every cell, judge the second half: false fail / fraud rates."""
    from scoring.score import NodeScorer
    from scoring.thresholds import calibrate
    from scoring.verify import verify

    for cell in cells:
        claims = cell["claims"]
        lps = ref.prompt_logprobs_many([(c.prompt_token_ids, c.completion_token_ids) for c in claims], 20)
        cell["margins"] = claim_margins(claims, ref, codec.vocab_size, sampler, lps)
        cell["noise"] = [
            margin_noise(n, r) for n, r in zip(cell.get("node_logprobs") or [[]] * len(claims), lps)
        ]
    half = [len(cell["claims"]) // 2 for cell in cells]
    cal = [m for cell, h in zip(cells, half) for m in cell["margins"][:h]]
    cal_noise = [x for cell, h in zip(cells, half) for ns in cell["noise"][:h] for x in ns]
    configs = sorted({json.dumps(c["node"]) for c in cells})
    th = calibrate(
        cal,
        noise=cal_noise,
        margin=margin,
        note=f"vLLM CPU, reference {json.dumps(REFERENCE_CONFIG)}, nodes {', '.join(configs)}; "
        "greedy and seeded sampled (T 0.7/0.8/1.0) challenges of the default model (seed 0)",
    )
    out = []
    for cell in cells:
        held = cell["claims"][len(cell["claims"]) // 2 :]
        vs = [verify(c, ref, codec, th, sampler) for c in held]
        scorer = NodeScorer("bench")
        for v in vs:
            scorer.observe_verification("h", "default", v)
        all_m = [m for ms in cell["margins"] for m in ms]
        noise = sorted(x for ns in cell["noise"] for x in ns)
        out.append(
            {
                "node": cell["node"],
                "reference": REFERENCE_CONFIG,
                "completions": len(vs),
                "tokens": sum(v.n_tokens for v in vs),
                "false_fail_rate": sum(v.verdict == "fail" for v in vs) / len(vs),
                "false_fraud_rate": sum(v.verdict == "fraud" for v in vs) / len(vs),
                "violations": sum(v.flagged for v in vs),
                "convicted": scorer.in_penalty("h"),
                "non_argmax_token_share": sum(m > 0 for m in all_m) / max(1, len(all_m)),
                "max_honest_margin": max(all_m, default=0.0),
                "margin_noise_p99": noise[int(0.99 * (len(noise) - 1))] if noise else None,
                "margin_noise_max": noise[-1] if noise else None,
                "fraud_reasons": sorted({r for v in vs if v.verdict == "fraud" for r in v.reasons})[:5],
            }
        )
    return {"cells": out, "calibration": th.provenance, "margin": margin}, th


def roc(honest_cells, attack_trials, th, score_config, max_challenges: int, epochs: int) -> list[dict]:
    """Detection within max_challenges vs simulated false conviction per epoch, as margin_tol moves
    (honest_rate / cheat_rate kept at th's). honest_cells: per honest cell, its completions' margins;
    the honest figures are the worst cell's (pooling cells would dilute the noisiest configuration)."""
    from scoring.score import NodeScorer

    def rate(pool, tol):
        return sum(m > tol for ms in pool for m in ms) / max(1, sum(len(ms) for ms in pool))

    rows = []
    for tol in ROC_TOLS:
        t = th.model_copy(update={"margin_tol": tol})
        caught = 0
        for trial in attack_trials:
            sc = NodeScorer("roc")
            for ms in trial[:max_challenges]:
                sc.observe_verification("x", "default", evidence_at(ms, t))
                if sc.in_penalty("x"):
                    caught += 1
                    break
        rows.append(
            {
                "margin_tol": tol,
                "honest_violation_rate_worst_cell": max(rate(pool, tol) for pool in honest_cells),
                "attack_violation_rate": rate([ms for trial in attack_trials for ms in trial], tol),
                "detect_rate": caught / len(attack_trials),
                "false_conviction_per_epoch_worst_cell": max(
                    simulated_false_conviction(pool, t, score_config, epochs, seed=int(tol * 1000))
                    for pool in honest_cells
                ),
            }
        )
    return rows


class NearTieFlipper(HFGenerator):
    """A cheat that runs the right model but takes the runner-up token wherever the top two are within
    `tol` (here 0.9 x the validator's margin_tol, so HF-vs-vLLM float differences do not push it out):
    the most it can steer output while staying inside the tolerance. Counts the tokens it changed."""

    def __init__(self, model_dir: Path, eos: frozenset[int], tol: float) -> None:
        super().__init__(model_dir, eos)
        self.tol, self.flips, self.tokens = tol, 0, 0

    def generate(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        import torch

        out: list[int] = []
        past, inp = None, torch.tensor([prompt_ids])
        with torch.no_grad():
            for _ in range(max_tokens):
                r = self.model(inp, past_key_values=past, use_cache=True)
                past = r.past_key_values
                top = torch.topk(torch.log_softmax(r.logits[0, -1].float(), -1), 2)
                tok = int(top.indices[0])
                if float(top.values[0] - top.values[1]) <= self.tol and int(top.indices[1]) not in self.eos:
                    tok = int(top.indices[1])
                    self.flips += 1
                self.tokens += 1
                out.append(tok)
                if tok in self.eos:
                    break
                inp = torch.tensor([[tok]])
        return out, "stop" if out and out[-1] in self.eos else "length"


# ---- challenge distinguishability ------------------------------------------------------------------
#
# What a node sees of a request (text, parameters, timing), for an organic stream and for challenges
# drawn by a validator that learns the organic mix from the shadow feed. The organic stand-in: human-
# written text (the half of the paragraphs the validator's writer never sees) in request shapes drawn
# from a fixed chat-API-like mix.


@functools.cache
def _paragraph_halves() -> tuple[list[str], list[str]]:
    """English paragraphs split by a hash: (the validator's private text source, the organic clients'
    text). Small sources are memorised: with the corpus and Python's documentation alone (75k words)
    passages repeat, and a classifier told the halves apart by the text statistics of passages it had
    seen (AUC 0.61-0.64 with challenges otherwise indistinguishable: 0.50-0.55 when both sides draw on
    one half). The standard library's docstrings bring it to about 300k words."""
    import hashlib
    from pydoc_data.topics import topics

    from scoring.organic import corpus_text

    a, b = [], []
    for text in [*corpus_text(), *topics.values(), *_stdlib_docstrings()]:
        for para in (" ".join(p.split()) for p in text.split("\n\n")):
            if len(para.split()) >= 8:
                (a if hashlib.sha256(para.encode()).digest()[0] % 2 else b).append(para)
    return a, b


def _stdlib_docstrings():
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                yield ast.get_docstring(node) or ""


class OrganicClients:
    """Organic requests: real sentences, shapes from a fixed chat-API-like mix."""

    _ROLES = (
        (("user",), 0.55),
        (("system", "user"), 0.2),
        (("user", "assistant", "user"), 0.15),
        (("system", "user", "assistant", "user"), 0.1),
    )
    _TEMPS = ((None, 0.25), (0.0, 0.2), (0.2, 0.05), (0.7, 0.25), (0.8, 0.1), (1.0, 0.15))
    _TOP_P = ((None, 0.8), (0.9, 0.1), (0.95, 0.1))
    _MAX_TOKENS = ((16, 0.1), (32, 0.15), (64, 0.2), (100, 0.1), (128, 0.2), (256, 0.15), (512, 0.1))

    def __init__(self, paragraphs: list[str], rng: random.Random) -> None:
        import re

        self.rng = rng
        self.words = [
            w for p in paragraphs for w in re.findall(r"\S+", p) if w not in ("User:", "Assistant:")
        ]
        self.starts = [
            i
            for i, w in enumerate(self.words)
            if w[:1].isupper() and (i == 0 or self.words[i - 1][-1] in ".?!")
        ]

    def _pick(self, table):
        return self.rng.choices([v for v, _ in table], [w for _, w in table])[0]

    def _text(self, words: int) -> str:
        i = self.rng.choice(self.starts)
        out = []
        while len(out) < words or out[-1][-1] not in ".?!":
            out.append(self.words[i % len(self.words)])
            i += 1
            if len(out) > 3 * words:
                break
        return " ".join(out)

    def request(self, model: str = "default") -> tuple[str, dict]:
        rng = self.rng
        chat = rng.random() < 0.75
        roles = self._pick(self._ROLES) if chat else ("prompt",)
        texts = [
            self._text(max(1, int(rng.lognormvariate(math.log(15 if r == "system" else 20), 0.7))))
            for r in roles
        ]
        body: dict = {"model": model, "max_tokens": self._pick(self._MAX_TOKENS)}
        for key, table in (("temperature", self._TEMPS), ("top_p", self._TOP_P)):
            v = self._pick(table)
            if v is not None:
                body[key] = v
        body["seed"] = rng.randrange(2**63)  # the gateway gives every request a seed
        if rng.random() < 0.6:
            body["stream"] = True
        if chat:
            body["messages"] = [{"role": r, "content": t} for r, t in zip(roles, texts)]
            return "/v1/chat/completions", body
        body["prompt"] = texts[0]
        return "/v1/completions", body


def request_features(path: str, body: dict, gap_s: float, codec=None) -> list[float]:
    """Everything a node sees of one request, as numbers: parameters, text statistics, timing."""
    import re

    msgs = body.get("messages") or [{"role": "prompt", "content": body.get("prompt", "")}]
    last = next((m["content"] for m in reversed(msgs) if m["role"] in ("user", "prompt")), "")
    allt = " ".join(m["content"] for m in msgs)
    words = re.findall(r"\S+", last)
    n_chars = max(1, len(last))
    roles = "".join(m["role"][0] for m in msgs)
    tok = 0.0
    if codec is not None:
        tok = float(len(codec.encode_chat(msgs) if "messages" in body else codec.encode_prompt(last)))
    return [
        float(path.endswith("chat/completions")),
        float(len(msgs)),
        float("s" in roles),
        float("a" in roles),
        body.get("temperature", -1.0),
        body.get("top_p", -1.0),
        float("temperature" in body),
        float(body.get("max_tokens", -1)),
        float(bool(body.get("stream"))),
        float(body.get("n", 1)),
        float(len(last)),
        float(len(words)),
        float(len(allt)),
        sum(len(w) for w in words) / max(1, len(words)),
        sum(not c.isalnum() and not c.isspace() for c in last) / n_chars,
        sum(c.isdigit() for c in last) / n_chars,
        sum(c.isupper() for c in last) / n_chars,
        float(last.rstrip()[-1:] in (".", "?", "!")),
        float(last.rstrip()[-1:] == "?"),
        float(last[:1].isupper()),
        len({w.lower() for w in words}) / max(1, len(words)),
        float(last.count(",")) / max(1, len(words)),
        float(sum(w[-1:] in ".?!" for w in words)),
        tok,
        tok / n_chars if tok else 0.0,
        gap_s,
    ]


def distinguishability(
    n: int,
    seed: int,
    codec=None,
    organic_rps: float = 1.0,
    challenge_config=None,
) -> dict:
    """Held-out AUC of classifiers telling challenges from organic requests at one node.

    A validator learns the organic mix from the shadow feed (a ServedCompletion per organic request:
    parameters and lengths only), then draws n challenges; n organic requests arrive meanwhile. Arrivals
    at the node are the merged Poisson streams of both (organic at `organic_rps`, challenges at 3
    validators' default rate). 70/30 stratified split; logistic regression and gradient boosting."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cluster.records import ServedCompletion
    from routing.config import GatewayConfig
    from scoring.challenge import ChallengeConfig, ChallengePool
    from scoring.organic import PromptWriter, shape_of

    rng = random.Random(seed)
    source, organic_text = _paragraph_halves()
    clients = OrganicClients(organic_text, random.Random(seed + 1))
    pool = ChallengePool(challenge_config or ChallengeConfig(), random.Random(seed + 2))
    pool.writer = PromptWriter(source)  # the validator's text; the organic half stays unseen
    shadow_rate = GatewayConfig.model_fields["shadow_rate"].default

    def offer(body: dict) -> None:  # what the validator sees of an organic request on the shadow feed
        msgs = body.get("messages")
        item = ServedCompletion(
            request_id="r",
            node_id="n",
            model="default",
            prompt=body.get("prompt"),
            messages=None if msgs is None else tuple(msgs),
            text="",
            completion_tokens=0,
            max_tokens=body["max_tokens"],
            temperature=body.get("temperature", 1.0),
            top_p=body.get("top_p"),
            stream=bool(body.get("stream")),
            temperature_set="temperature" in body,
        )
        pool.observe_shape(shape_of(item))

    for _ in range(pool.config.mix_window):  # the validator has run a while: a full window
        offer(clients.request()[1])
    challenge_rate = 3 * ChallengeConfig().rate_per_node_per_min / 60.0
    # One merged Poisson stream at the node; organic requests are kept at the challenges' rate so the
    # classes balance, but every gap is to the previous request of any kind (what the node measures).
    # The feed stays live: each organic arrival reaches the validator's mix at the gateway's shadow rate.
    keep = challenge_rate / organic_rps
    rows, labels, t, last_t, n_chal = [], [], 0.0, 0.0, 0
    while n_chal < n:
        t += rng.expovariate(organic_rps + challenge_rate)
        gap, last_t = t - last_t, t
        is_challenge = rng.random() < challenge_rate / (organic_rps + challenge_rate)
        if is_challenge:
            r = pool.sample("n", "default")
            path, body = r.path, r.body
            n_chal += 1
        else:
            kept, fed = rng.random() < keep, rng.random() < shadow_rate
            if not (kept or fed):
                continue
            path, body = clients.request()
            if fed:
                offer(body)
            if not kept:
                continue
        rows.append(request_features(path, body, gap, codec))
        labels.append(int(is_challenge))
    x_tr, x_te, y_tr, y_te = train_test_split(rows, labels, test_size=0.3, stratify=labels, random_state=seed)
    models = {
        "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "gradient_boosting": HistGradientBoostingClassifier(random_state=seed),
    }
    aucs = {}
    for name, m in models.items():
        m.fit(x_tr, y_tr)
        aucs[name] = roc_auc_score(y_te, m.predict_proba(x_te)[:, 1])
    return {"auc": max(aucs.values()), "by_classifier": aucs, "requests": len(rows), "held_out": len(y_te)}


def run(quick: bool, max_challenges: int, organic_rps: float) -> dict:
    from cluster.model import build_default_model
    from routing.config import GatewayConfig
    from scoring.challenge import ChallengeConfig
    from scoring.reference import HFCodec, VllmReferenceEngine
    from scoring.replay import vllm_cpu_argmax
    from scoring.score import NodeScorer, ScoreConfig
    from scoring.verify import verify

    con = _progress()
    n_honest = 120 if quick else 2200
    n_sampled = 120 if quick else 2000
    per_cell = 40 if quick else 2000
    trials = 10 if quick else 100
    epochs = 20 if quick else 200
    t_start = time.time()
    d0, d1 = build_default_model(0), build_default_model(1)
    noisy = perturbed_model(d0, rel_std=0.05)
    codec = HFCodec.from_pretrained(d0)
    sampler = vllm_cpu_argmax  # the nodes here are vLLM CPU engines: their seeded sampler, replayed
    score_config = ScoreConfig()

    nodes = HETERO_NODES_QUICK if quick else HETERO_NODES_FULL
    if "avx512f" in machine()["isa"]:
        nodes = (*nodes, ISA_NODE)
    con.log(f"honest heterogeneous nodes: {len(nodes)} engines x batch {HETERO_BATCHES}, {per_cell} each")
    cells = hetero_node_claims(d0, codec, nodes, per_cell)

    con.log(f"starting the reference engine {REFERENCE_CONFIG}")
    llm = cpu_engine(d0, **REFERENCE_CONFIG)
    ref = VllmReferenceEngine(llm=llm)

    con.log(f"the reference's own engine as a node: {n_honest} greedy at batch 1/4/16, {n_sampled} sampled")
    honest = honest_completions(llm, codec, n_honest, seed=1)
    trng = random.Random(3)
    sreqs = [
        (p, m, trng.choice((0.7, 0.8, 1.0)), s) for p, m, _, s in challenge_requests(codec, n_sampled, 2)
    ]
    honest_sampled = vllm_claims(llm, sreqs, batch_sizes=(1, 4, 16))
    mixed = [c for pair in zip(honest, honest_sampled) for c in pair]
    cells.append({"node": {**REFERENCE_CONFIG, "batch": "1/4/16"}, "claims": mixed})
    t0 = time.perf_counter()
    hetero, th = hetero_section(cells, ref, codec, sampler, score_config)
    ref_s_per_verification = (time.perf_counter() - t0) / sum(len(c["claims"]) for c in cells)
    con.log(f"calibrated: {th.provenance}")
    for cell in hetero["cells"]:
        con.log(f"hetero {cell}")
    held_pool = [m for cell in cells for m in cell["margins"][len(cell["margins"]) // 2 :]]
    held_n = sum(c["completions"] for c in hetero["cells"])
    false_fraud = sum(c["false_fraud_rate"] * c["completions"] for c in hetero["cells"]) / held_n
    false_fail = sum(c["false_fail_rate"] * c["completions"] for c in hetero["cells"]) / held_n
    a = score_config.threshold
    bound = {
        "per_node_per_epoch": score_config.alpha + score_config.max_completions_per_epoch * th.fraud_alpha,
        "sequential_test_alpha": score_config.alpha,
        "fraud_rule": score_config.max_completions_per_epoch * th.fraud_alpha,
        "threshold_nats": a,
        "honest_rate_p0": th.honest_rate,
        "cheat_rate_p1": th.cheat_rate,
        "margin_tol_nats": th.margin_tol,
        "assumption": f"<= {score_config.max_completions_per_epoch} completions verified per node per epoch "
        "by one validator; an honest token is a violation with probability <= p0 given the past "
        "(Ville's inequality per start point, union over start points: P <= M e^-A + M fraud_alpha)",
        "simulated_false_conviction_per_epoch": simulated_false_conviction(
            held_pool, th, score_config, epochs, seed=1
        ),
        "simulated_epochs": epochs,
    }
    con.log(f"false-conviction bound: {bound}")
    honest_claims = [c for cell in cells for c in cell["claims"][len(cell["claims"]) // 2 :]]
    mean_tokens = statistics.mean(
        len(c.prompt_token_ids) + c.reported_completion_tokens for c in honest_claims
    )

    con.log("quantized and substituted models in their own vLLM engines (the cheaters)")
    from cluster.quantize import quantized_model

    engine_claims = {
        "quant_int8": engine_attack_claims(quantized_model(d0, "int8"), codec, trials, max_challenges),
        "quant_int4": engine_attack_claims(quantized_model(d0, "int4"), codec, trials, max_challenges),
        "substitution_sampled": engine_attack_claims(d1, codec, trials, max_challenges, temperature=0.8),
    }

    flipper = NearTieFlipper(d0, codec.eos_token_ids, 0.9 * th.margin_tol)
    attackers = {
        "substitution": HFGenerator(d1, codec.eos_token_ids),
        "perturbed_weights": HFGenerator(noisy, codec.eos_token_ids),
        "near_tie_flipper": flipper,
    }
    rng = random.Random(5)
    honest_pool = honest[len(honest) // 2 :]

    def attack_claim(name: str, prompt, max_tokens, trial: int, k: int):
        if name in engine_claims:
            return engine_claims[name][trial][k - 1]
        if name == "near_tie_flipper":  # token-by-token in transformers: kept short (the claim says so)
            return _claim_from(flipper, codec, prompt, min(max_tokens, FLIPPER_MAX_TOKENS))
        if name in attackers:
            return _claim_from(attackers[name], codec, prompt, max_tokens)
        c = rng.choice(honest_pool)
        ids = list(c.completion_token_ids)
        if name == "truncated":
            keep = ids[: max(1, len(ids) // 2)]
            finish = "length" if rng.random() < 0.5 else "stop"
            return c.model_copy(
                update={
                    "completion_token_ids": tuple(keep),
                    "text": codec.decode(keep),
                    "reported_completion_tokens": len(keep),
                    "finish_reason": finish,
                    "max_tokens": max(c.max_tokens, len(ids)),
                }
            )
        if name == "inflated_tokens":
            return c.model_copy(update={"reported_completion_tokens": len(ids) + max(2, len(ids) // 5)})
        return c

    attacks: dict[str, dict] = {}
    names = (
        "substitution",
        "perturbed_weights",
        "truncated",
        "inflated_tokens",
        "slow_node",
        "quant_int8",
        "quant_int4",
        "substitution_sampled",
        "near_tie_flipper",
    )
    for name in names:
        to_detect, flagged_rates = [], []
        for trial in range(trials):
            scorer = NodeScorer(f"bench-{trial}")
            prompts = challenge_prompts(codec, max_challenges, seed=1000 + trial)
            caught = None
            for k, (p, m) in enumerate(prompts, start=1):
                if name == "slow_node":
                    for honest_id in ("h1", "h2", "h3"):
                        scorer.observe_challenge(honest_id, "default", True, 0.05, 200.0)
                        scorer.observe_verification(honest_id, "default", "pass")
                    scorer.observe_challenge("x", "default", True, 0.2, 50.0)  # 4x slower
                    scorer.observe_verification("x", "default", "pass")  # a node has a score once verified
                    s = next(s for s in scorer.scores() if s.node_id == "x")
                    if s.speed is not None and s.speed < 0.5:
                        caught = k
                        break
                    continue
                claim = attack_claim(name, p, m, trial, k)
                v = verify(claim, ref, codec, th, sampler)
                flagged_rates.append(v.flagged_rate)
                scorer.observe_verification("x", "default", v)
                if scorer.in_penalty("x"):
                    caught = k
                    break
            to_detect.append(caught)
        hits = [k for k in to_detect if k is not None]
        attacks[name] = {
            "detect_rate": len(hits) / trials,
            "challenges_to_detect_p50": statistics.median(hits) if hits else None,
            "trials": trials,
            "max_challenges": max_challenges,
            "mean_flagged_token_rate": statistics.mean(flagged_rates) if flagged_rates else None,
        }
        con.log(f"{name}: {attacks[name]}")
    attacks["near_tie_flipper"]["changed_token_share"] = flipper.flips / max(1, flipper.tokens)
    attacks["near_tie_flipper"]["flip_tol_nats"] = flipper.tol

    con.log("ROC of the quantized nodes as margin_tol moves")
    rocs = {}
    for name in ("quant_int8", "quant_int4"):
        trials_m = [claim_margins(t, ref, codec.vocab_size, sampler) for t in engine_claims[name]]
        honest_cells = [cell["margins"][len(cell["margins"]) // 2 :] for cell in cells]
        rocs[name] = roc(honest_cells, trials_m, th, score_config, max_challenges, epochs)
        con.log(f"roc {name}: {rocs[name]}")

    con.log("challenge distinguishability (classifiers over what a node sees)")
    n_dist = 1000 if quick else 3000
    dist = {"shadow_feed": distinguishability(n_dist, seed=11, codec=codec)}
    con.log(f"distinguishability: {dist}")

    challenge_rps = 3 * ChallengeConfig().rate_per_node_per_min / 60.0
    overhead = (challenge_rps * mean_tokens) / (organic_rps * mean_tokens)
    shadow_rate = GatewayConfig.model_fields["shadow_rate"].default
    shadow_reference_ratio = 3 * shadow_rate * ChallengeConfig().shadow_rate
    return {
        "attacks": attacks,
        "hetero": hetero,
        "roc": rocs,
        "false_conviction_bound": bound,
        "false_positive_rate": false_fraud,
        "false_fail_rate": false_fail,
        "verified_completions": held_n,
        "validator_overhead": overhead,
        "challenge_distinguishability_auc": dist["shadow_feed"]["auc"],
        "challenge_distinguishability": dist,
        "shadow_reference_ratio": shadow_reference_ratio,
        "thresholds": th.model_dump(),
        "reference_seconds_per_verification": ref_s_per_verification,
        "assumptions": {
            "validators": 3,
            "challenge_rate_per_node_per_min": ChallengeConfig().rate_per_node_per_min,
            "organic_rps_per_node": organic_rps,
            "perturbation_rel_std": 0.05,
            "gateway_shadow_rate": shadow_rate,
            "mean_tokens_per_request": mean_tokens,
        },
        "quick": quick,
        "wall_seconds": time.time() - t_start,
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="Where to write the JSON results.")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="Fewer completions and trials (42 min on a loaded 2-core machine, 2026-12-07).",
    )
    ap.add_argument("--max-challenges", type=int, default=16, help="Challenges per trial before giving up.")
    ap.add_argument("--organic-rps", type=float, default=1.0, help="Organic requests/s per node (overhead).")
    args = ap.parse_args()
    res = run(args.quick, args.max_challenges, args.organic_rps)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: res[k]
                for k in (
                    "attacks",
                    "false_positive_rate",
                    "verified_completions",
                    "validator_overhead",
                    "challenge_distinguishability_auc",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

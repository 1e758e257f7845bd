"""Measured validator overhead (issue 15): what validators cost a live network under organic load.

    python -m benchmarks.overhead --out FILE.json [--quick] [--clients 8] [--validators 3]

Starts a real local network (`deploy.network.LocalNetwork`): the two default nodes, `--validators`
validators at the network's default challenge rate sharing one reference engine, the default shadow_rate,
embedded settlement. Organic load: `--clients` concurrent clients (the official `openai` client) send
chat completions drawn from a chat-API-like mix (benchmarks.verification.OrganicClients: 1-4 messages of
real sentences, greedy and sampled, 16-512 max_tokens, 60% streamed) for a fixed time (quick 120 s,
full 600 s), after an uncounted warm-up.

Every figure comes from what the network records, not from assumed rates:
- Tokens: the usage ledger (settlement's, through the usage store), i.e. the gateway's own count of what
  each node served. Organic and warm-up traffic each use their own API key, so the ledger's `key_id` tells
  them apart; the validators' challenges carry the challenge key, for which the gateway records no client
  key (`key_id` ''; routing/gateway.py `check_auth`, routing/request_context.py `RequestContext.record`).
  validator_overhead_measured = challenge tokens / organic tokens (prompt + completion), for requests
  started in the load window. The request ids the client got back (x-meritnet-request-id) cross-check
  that split.
- Engine time: CPU seconds of the processes (with their children: vLLM's engine core) of the shared
  reference engine actor and of the node replicas, over the same interval; and the reference engine's busy
  time and teacher-forced tokens, counted by a thin meter put around its engine in the running actor.
- The validators' own counters (challenges, verdicts, shadow verifications) and vLLM's engine token
  counters (ray_vllm_*, from Ray's metrics agents) as cross-checks.
The JSON's `definitions` says what each figure is. Challenges arrive as a Poisson process at
validators x nodes x 0.5 per minute: ~6 in a quick run, ~30 in a full one, so the measured ratio carries
a relative error of about 1/sqrt(challenges) (`challenge_count_rel_stderr`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import random
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# httpx (under openai) logs every request at INFO: CPU the network under test shares with the client.
logging.getLogger("httpx").setLevel(logging.WARNING)

GOAL = 0.05  # issue 15: validator_overhead_measured <= 0.05
METER_KEYS = ("calls", "verifications", "prompt_tokens", "completion_tokens", "busy_s")

DEFINITIONS = {
    "validator_overhead_measured": "challenge tokens / organic tokens: prompt + completion tokens the "
    "gateway metered (usage ledger) for the validators' challenges and for the organic clients' requests, "
    "both started in the load window, every status (tokens a node served even if the request then failed)",
    "reference_tokens_over_node_tokens": "tokens the reference engine teacher-forced (prompt + completion "
    "per verification, challenges and shadow verifications, counted by the meter in its actor) / tokens the "
    "nodes served in the engine interval (engines.ledger_tokens)",
    "reference_cpu_over_node_cpu": "engines.reference.cpu_s / engines.nodes.cpu_s",
    "goal": "issue 15: validator_overhead_measured <= 0.05; met is null without organic tokens",
    "overhead.tokens": "= validator_overhead_measured",
    "overhead.completion_tokens": "challenge completion tokens / organic completion tokens (same records)",
    "overhead.requests": "challenge requests / organic requests (same records)",
    "tokens.organic": "ledger records with the organic clients' key_id (all of them started in the window)",
    "tokens.challenge": "ledger records with key_id '' (the challenge key: the gateway records no client "
    "key for it, and every client here has a key) started in the load window",
    "tokens.unclassified": "ledger records in the window with any other key_id (the warm-up's: expected 0)",
    "tokens.*": "requests, by_status (ok/error/cancelled), prompt_tokens, completion_tokens, tokens (their "
    "sum) and by_node, as the gateway metered them",
    "rates.organic_requests_per_s": "organic requests / window seconds (also per node: / nodes)",
    "rates.organic_tokens_per_s": "organic tokens / window seconds",
    "rates.challenges_per_node_per_min_measured": "challenge requests / nodes / window minutes (all "
    "validators together)",
    "rates.challenges_per_node_per_min_configured": "sum over validators of challenges_per_node_per_min",
    "challenge_count_rel_stderr": "1/sqrt(challenge requests): the Poisson error of the challenge count, "
    "the main uncertainty of validator_overhead_measured",
    "client": "what the organic clients saw: requests sent in the window, ok, errors by exception type, "
    "usage_tokens (the usage the gateway returned to them; a request cut off mid-stream has none)",
    "id_check": "the organic clients' request ids (x-meritnet-request-id) against the ledger's split: "
    "agrees = none of them is recorded as a challenge and every organic record is one of them",
    "validators.count": "validators running (each at challenges_per_node_per_min_each)",
    "validators.counters": "the validators' own counters summed over validators and nodes, over the engine "
    "interval: challenges sent, answered, verdicts (pass/fail/fraud), shadow verifications (shadow_*)",
    "engines.interval": "from the start of the load window to the ledger read (after the clients drained and "
    "one validator timeout passed the window's end, so its challenges and verifications are done)",
    "engines.reference": "the shared reference engines' meter over the interval: calls (batches), "
    "verifications, prompt_tokens and completion_tokens teacher-forced, tokens (their sum), busy_s (wall "
    "seconds inside engine calls; the actor runs one at a time), busy_share (busy_s / interval seconds)",
    "engines.reference.cpu_s": "CPU seconds (user + system) of the reference engine actor's process and its "
    "children (vLLM's engine core) over the interval",
    "engines.nodes.cpu_s": "the same for the node replicas' processes (each with its vLLM engine core), "
    "summed; cpu_s_by_replica per node/replica",
    "engines.nodes.ray_vllm_tokens": "vLLM's own prompt + generation token counters of the node engines "
    "(ray_vllm_*, summed over Ray's metrics agents) over the interval: a cross-check of "
    "engines.ledger_tokens (Ray exports every few seconds, so the edges may differ slightly)",
    "engines.validator_actors_cpu_s": "CPU seconds of each validator actor's process over the interval "
    "(challenge traffic, tokenizing, verification logic; not the shared reference engine)",
    "engines.ledger_tokens": "prompt + completion tokens of every ledger record started in the interval",
    "window": "the organic load window [start, end) in unix seconds and its length; the clients start no "
    "request after end and the last ones finish by clients_drained_at; warmup_s of uncounted load before",
}


# ---- pure: ledger records and counters -> figures ---------------------------------------------------


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def split(records: Iterable, organic_key_id: str, start: float, end: float) -> dict[str, list]:
    """The ledger's records by who sent them: 'organic' (the organic clients' key, wherever they
    started), 'challenge' (no client key: the validators' challenge key) and 'unclassified' (another key),
    the latter two for requests started in [start, end)."""
    out: dict[str, list] = {"organic": [], "challenge": [], "unclassified": []}
    for r in records:
        if r.key_id == organic_key_id:
            out["organic"].append(r)
        elif start <= r.started_at < end:
            out["challenge" if r.key_id == "" else "unclassified"].append(r)
    return out


def tally(records: Iterable) -> dict:
    """Requests, statuses and gateway-metered tokens of some usage records, in total and per node."""
    records = list(records)
    by_node: dict[str, dict[str, int]] = {}
    for r in records:
        n = by_node.setdefault(r.node_id, {"requests": 0, "tokens": 0})
        n["requests"] += 1
        n["tokens"] += r.prompt_tokens + r.completion_tokens
    prompt = sum(r.prompt_tokens for r in records)
    completion = sum(r.completion_tokens for r in records)
    return {
        "requests": len(records),
        "by_status": dict(sorted(Counter(r.status for r in records).items())),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "tokens": prompt + completion,
        "by_node": dict(sorted(by_node.items())),
    }


def overhead(organic: Mapping, challenge: Mapping) -> dict:
    """Challenge load relative to organic load, from two `tally` results."""
    return {
        "tokens": ratio(challenge["tokens"], organic["tokens"]),
        "completion_tokens": ratio(challenge["completion_tokens"], organic["completion_tokens"]),
        "requests": ratio(challenge["requests"], organic["requests"]),
    }


def id_check(parts: Mapping[str, list], client_ids: Iterable[str]) -> dict:
    """Does the ledger's key-based split agree with the request ids the organic clients were given?"""
    client = set(client_ids)
    organic = {r.request_id for r in parts["organic"]}
    challenge = {r.request_id for r in parts["challenge"]}
    out = {
        "client_request_ids": len(client),
        "recorded_as_organic": len(client & organic),
        "recorded_as_challenge": len(client & challenge),
        "organic_records_not_from_client": len(organic - client),
        "client_ids_without_record": len(client - organic - challenge),
    }
    out["agrees"] = out["recorded_as_challenge"] == 0 and out["organic_records_not_from_client"] == 0
    return out


def validator_totals(stats: Iterable[Mapping[str, Mapping[str, int]]]) -> dict[str, int]:
    """ValidatorActor.stats() of several validators (node -> counter -> n) summed per counter."""
    total: Counter[str] = Counter()
    for per_node in stats:
        for counts in per_node.values():
            # detected_after is a position (verifications until a first penalty), not a count
            total.update({k: v for k, v in counts.items() if k != "detected_after"})
    return dict(sorted(total.items()))


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after)}


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds a process tree used between two snapshots (pid -> cumulative CPU s). A process that
    appeared counts from 0; one that ended took its time with it (not counted)."""
    return sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())


def sum_samples(text: str, names: Iterable[str]) -> float:
    """Sum of the samples called any of `names` (with or without `_total`) in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {n.removesuffix("_total") for n in names}
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.removesuffix("_total") in wanted and math.isfinite(s.value)
    )


# ---- live measurement: I/O only ---------------------------------------------------------------------


class MeteredEngine:
    """Times the reference engine's calls and counts what it teacher-forces; delegates everything.

    Installed in the running ReferenceEngineService actor (`_meter_reference`), which runs one engine
    call at a time, so the summed call time is the engine's busy time."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._m = dict.fromkeys(METER_KEYS, 0)

    def prompt_logprobs_many(self, pairs, top_k):
        t0 = time.perf_counter()
        try:
            return self._engine.prompt_logprobs_many(pairs, top_k)
        finally:
            with self._lock:
                self._m["busy_s"] += time.perf_counter() - t0
                self._m["calls"] += 1
                self._m["verifications"] += len(pairs)
                self._m["prompt_tokens"] += sum(len(p) for p, _ in pairs)
                self._m["completion_tokens"] += sum(len(c) for _, c in pairs)

    def meter(self) -> dict:
        with self._lock:
            return dict(self._m)

    def __getattr__(self, name):  # only for what this class does not define
        if name == "_engine":
            raise AttributeError(name)
        return getattr(self._engine, name)


def _meter_reference(service) -> dict:
    """Runs in the reference engine actor (`__ray_call__`): meter its engine once; the meter so far."""
    if not hasattr(service.engine, "meter"):
        service.engine = MeteredEngine(service.engine)
    return service.engine.meter()


def _reference_meters(net) -> dict[str, dict]:
    """model -> its shared reference engine's meter so far (metering it from now on, the first time)."""
    import ray

    return {
        m: ray.get(h.__ray_call__.remote(_meter_reference), timeout=60)
        for m, h in net.reference_engines.items()
    }


def _pid(_actor) -> int:
    return os.getpid()


def _tree_cpu(pid: int) -> dict[int, float]:
    """pid -> cumulative CPU seconds of a process and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = t.user + t.system
    return out


def _actor_pids(net) -> dict[str, dict[str, int]]:
    """Process ids of the network's reference engines, node replicas and validators (asked of each
    actor: names repeat across networks on one machine, process titles are not enough)."""
    import ray

    from cluster.records import deployment_name

    replicas: dict[str, object] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        for spec in net.specs:
            if a["name"].startswith(f"SERVE_REPLICA::{deployment_name(spec)}#"):
                replicas[f"{spec.node_id}/{a['name'].rsplit('#', 1)[-1]}"] = ray.get_actor(
                    a["name"], namespace=a["namespace"]
                )
    groups = {"reference": net.reference_engines, "nodes": replicas, "validators": net.validators}
    return {
        group: {name: ray.get(h.__ray_call__.remote(_pid), timeout=60) for name, h in handles.items()}
        for group, handles in groups.items()
    }


def _cpu_snapshot(pids: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, dict[int, float]]]:
    return {g: {name: _tree_cpu(pid) for name, pid in members.items()} for g, members in pids.items()}


def _cpu_used(before: Mapping, after: Mapping) -> dict[str, dict[str, float]]:
    return {g: {name: cpu_delta(before[g][name], after[g][name]) for name in after[g]} for g in after}


def _vllm_tokens() -> float | None:
    """Node engines' prompt + generation tokens so far, summed over Ray's metrics agents (None if none
    answers)."""
    import httpx
    import ray

    total, answered = 0.0, False
    for n in ray.nodes():
        if not n["Alive"]:
            continue
        try:
            text = httpx.get(
                f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics", timeout=30
            ).text
        except httpx.HTTPError:
            continue
        answered = True
        total += sum_samples(text, ("ray_vllm_prompt_tokens", "ray_vllm_generation_tokens"))
    return total if answered else None


def _chat_body(mix) -> dict:
    """One organic chat request from the mix (its completions-API share is redrawn)."""
    while True:
        path, body = mix.request()
        if path.endswith("/chat/completions"):
            return body


async def _one(client, body: dict) -> dict:
    """One chat completion with the openai client: its gateway request id, usage and outcome."""
    import httpx
    import openai

    kwargs = dict(body)
    stream = bool(kwargs.get("stream"))
    if stream:
        kwargs["stream_options"] = {"include_usage": True}
    rid, usage = None, None
    try:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        rid = raw.headers.get("x-meritnet-request-id")
        parsed = raw.parse()
        if stream:
            async for chunk in parsed:
                usage = chunk.usage or usage
        else:
            usage = parsed.usage
    except (openai.APIError, httpx.HTTPError) as exc:  # httpx: a stream cut mid-way
        response = getattr(exc, "response", None)
        if rid is None and response is not None:
            rid = response.headers.get("x-meritnet-request-id")
        return {"ok": False, "rid": rid, "error": type(exc).__name__, "tokens": 0}
    tokens = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
    return {"ok": True, "rid": rid, "error": None, "tokens": tokens}


async def _organic_load(
    base_url: str, api_key: str, clients: int, seconds: float, seed: int, texts: list[str], on_result
) -> tuple[list[dict], float, float]:
    """`clients` clients, each starting its next request when the last ends, for `seconds`. Returns the
    results, the window's start and end (unix time) and waits for the last requests to finish."""
    from openai import AsyncOpenAI

    from benchmarks.verification import OrganicClients

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600.0)
    start = time.time()
    deadline = time.monotonic() + seconds

    async def worker(w: int) -> list[dict]:
        mix, out = OrganicClients(texts, random.Random(seed * 1000 + w)), []
        while time.monotonic() < deadline:
            res = await _one(client, _chat_body(mix))
            on_result(res)
            out.append(res)
        return out

    try:
        per_worker = await asyncio.gather(*(worker(w) for w in range(clients)))
    finally:
        await client.close()
    return [r for rs in per_worker for r in rs], start, start + seconds


def _run_load(
    progress,
    label: str,
    base_url: str,
    api_key: str,
    clients: int,
    seconds: float,
    seed: int,
    texts: list[str],
) -> tuple[list[dict], float, float]:
    """_organic_load with a progress bar over its duration (requests, tokens and errors so far)."""
    done = {"n": 0, "tokens": 0, "errors": 0}
    task = progress.add_task(label, total=seconds)

    def on_result(res: dict) -> None:
        done["n"] += 1
        done["tokens"] += res["tokens"]
        done["errors"] += not res["ok"]

    async def main():
        t0 = time.monotonic()
        load = asyncio.ensure_future(
            _organic_load(base_url, api_key, clients, seconds, seed, texts, on_result)
        )
        while not load.done():
            progress.update(
                task,
                completed=min(seconds, time.monotonic() - t0),
                description=f"{label}: {done['n']} requests, {done['tokens']} tokens, {done['errors']} errors",
            )
            await asyncio.wait({load}, timeout=0.5)
        return load.result()

    out = asyncio.run(main())
    progress.update(task, completed=seconds)
    return out


@dataclass
class Observations:
    """What a live run gathers (`run`); `summarise` turns it into the figures, without Ray."""

    records: list  # the usage ledger's UsageRecords since the network started
    results: list[dict]  # the organic clients' outcomes: ok, rid, error, tokens (their usage)
    organic_key_id: str  # key_id the ledger records for the organic clients' key
    start: float  # the load window [start, end), unix time
    end: float
    read_at: float  # when the ledger and counters were read: the engine interval is [start, read_at)
    nodes: int
    challenge_rates: list[float]  # each validator's configured challenges_per_node_per_min
    meter: dict[str, float]  # the reference engines' meter over the engine interval (MeteredEngine)
    validator_counters: dict[str, int]  # the validators' own counters over the engine interval
    cpu_s: dict[str, dict[str, float]]  # 'reference' / 'nodes' / 'validators' -> process -> CPU seconds
    vllm_tokens: float | None  # node engines' own token counters over the engine interval


def summarise(obs: Observations) -> dict:
    """The benchmark's figures (see DEFINITIONS) from what the run observed."""
    parts = split(obs.records, obs.organic_key_id, obs.start, obs.end)
    tallies = {name: tally(rs) for name, rs in parts.items()}
    organic, challenge = tallies["organic"], tallies["challenge"]
    window_s, interval_s = obs.end - obs.start, obs.read_at - obs.start
    over = overhead(organic, challenge)
    node_tokens = tally(r for r in obs.records if obs.start <= r.started_at < obs.read_at)["tokens"]
    ref_tokens = obs.meter["prompt_tokens"] + obs.meter["completion_tokens"]
    node_cpu, ref_cpu = sum(obs.cpu_s["nodes"].values()), sum(obs.cpu_s["reference"].values())
    results = obs.results
    return {
        "validator_overhead_measured": over["tokens"],
        "reference_tokens_over_node_tokens": ratio(ref_tokens, node_tokens),
        "reference_cpu_over_node_cpu": ratio(ref_cpu, node_cpu),
        "goal": {
            "validator_overhead_measured_max": GOAL,
            "met": None if over["tokens"] is None else over["tokens"] <= GOAL,
        },
        "overhead": over,
        "tokens": tallies,
        "rates": {
            "organic_requests_per_s": organic["requests"] / window_s,
            "organic_requests_per_s_per_node": organic["requests"] / window_s / obs.nodes,
            "organic_tokens_per_s": organic["tokens"] / window_s,
            "challenges_per_node_per_min_measured": challenge["requests"] / obs.nodes / (window_s / 60),
            "challenges_per_node_per_min_configured": sum(obs.challenge_rates),
        },
        "challenge_count_rel_stderr": 1 / math.sqrt(challenge["requests"]) if challenge["requests"] else None,
        "client": {
            "requests": len(results),
            "ok": sum(r["ok"] for r in results),
            "errors": dict(Counter(r["error"] for r in results if r["error"])),
            "usage_tokens": sum(r["tokens"] for r in results),
        },
        "id_check": id_check(parts, [r["rid"] for r in results if r["rid"]]),
        "validators": {
            "count": len(obs.challenge_rates),
            "challenges_per_node_per_min_each": list(obs.challenge_rates),
            "counters": dict(obs.validator_counters),
        },
        "engines": {
            "interval": {"start": obs.start, "end": obs.read_at, "seconds": interval_s},
            "reference": {
                **obs.meter,
                "tokens": ref_tokens,
                "busy_share": ratio(obs.meter["busy_s"], interval_s),
                "cpu_s": ref_cpu,
            },
            "nodes": {
                "cpu_s": node_cpu,
                "cpu_s_by_replica": obs.cpu_s["nodes"],
                "ray_vllm_tokens": obs.vllm_tokens,
            },
            "validator_actors_cpu_s": obs.cpu_s["validators"],
            "ledger_tokens": node_tokens,
        },
        "window": {"start": obs.start, "end": obs.end, "seconds": window_s},
    }


def run(seconds: float, clients: int, n_validators: int, warmup_s: float, seed: int, quick: bool) -> dict:
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from benchmarks.verification import _paragraph_halves
    from deploy.config import NetworkConfig
    from deploy.network import LocalNetwork
    from routing.keys import key_from_secret
    from scoring.challenge import ChallengeConfig
    from scoring.validator import ValidatorConfig
    from tests.support.ports import free_port

    con = Console(stderr=True)
    wall0 = time.time()
    warm_key, organic_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    state = Path(tempfile.mkdtemp(prefix="meritnet-overhead-"))
    cfg = NetworkConfig(
        port=free_port(),
        state_dir=state,
        api_keys=[warm_key, organic_key],  # every client has a key: a record without one is a challenge
        validators=[{"validator_id": f"v{i + 1}"} for i in range(n_validators)],  # default rate and stake
    )
    _, texts = _paragraph_halves()  # human-written sentences (benchmarks.verification's organic half)
    net = LocalNetwork(cfg, on_step=con.log)
    load_avg = {"start": os.getloadavg()}
    try:
        net.start()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=con)
        with progress:
            _run_load(
                progress, "warm-up (not counted)", net.base_url, warm_key, clients, warmup_s, seed + 1, texts
            )
            time.sleep(10)  # Ray's metrics agents export every few seconds: let the warm-up's counts land
            pids = _actor_pids(net)
            meter0 = _reference_meters(net)
            val0 = validator_totals(ray.get([h.stats.remote() for h in net.validators.values()]))
            vllm0, cpu0 = _vllm_tokens(), _cpu_snapshot(pids)
            results, start, end = _run_load(
                progress, "organic load", net.base_url, organic_key, clients, seconds, seed, texts
            )
            drained = time.time()
            # A challenge started before `end` has finished (or been given up) one validator timeout later.
            grace = end + ValidatorConfig.model_fields["timeout_s"].default + 5.0 - time.time()
            if grace > 0:
                con.log(f"waiting {grace:.0f} s for the window's challenges and verifications to finish")
                time.sleep(grace)
        cpu1, vllm1, meter1 = _cpu_snapshot(pids), _vllm_tokens(), _reference_meters(net)
        val1 = validator_totals(ray.get([h.stats.remote() for h in net.validators.values()]))
        read_at = time.time()
        records = ray.get(net.usage_store.all.remote())
    finally:
        load_avg["end"] = os.getloadavg()
        net.stop()
        shutil.rmtree(state, ignore_errors=True)

    meter: Counter[str] = Counter()
    for model in meter1:
        meter.update(delta(meter1[model], meter0[model]))
    obs = Observations(
        records=records,
        results=results,
        organic_key_id=key_from_secret(organic_key).key_id,
        start=start,
        end=end,
        read_at=read_at,
        nodes=len(cfg.nodes),
        challenge_rates=[v.challenges_per_node_per_min for v in cfg.validators],
        meter={k: meter[k] for k in METER_KEYS},
        validator_counters=delta(val1, val0),
        cpu_s=_cpu_used(cpu0, cpu1),
        vllm_tokens=None if vllm0 is None or vllm1 is None else vllm1 - vllm0,
    )
    out = summarise(obs)
    out["window"].update(clients_drained_at=drained, warmup_s=warmup_s, clients=clients)
    out["config"] = {
        "nodes": [n.node_id for n in cfg.nodes],
        "validators": n_validators,
        "gateway_shadow_rate": cfg.shadow_rate,
        "validator_shadow_rate": ChallengeConfig().shadow_rate,
        "shared_reference_engine": cfg.shared_reference_engine,
        "consensus_period_s": cfg.consensus_period_s,
        "epoch_length_s": cfg.epoch_length_s,
        "max_model_len": cfg.engine.max_model_len,
        "seed": seed,
    }
    out["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1_5_15": load_avg,
    }
    out["definitions"] = DEFINITIONS
    out["quick"] = quick
    out["wall_seconds"] = time.time() - wall0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="Where to write the JSON results.")
    ap.add_argument("--quick", action="store_true", help="120 s of organic load instead of 600 s.")
    ap.add_argument("--seconds", type=float, default=None, help="Length of the load window (overrides).")
    ap.add_argument("--clients", type=int, default=8, help="Concurrent organic clients.")
    ap.add_argument("--validators", type=int, default=3, help="Validators (each at the default rate).")
    ap.add_argument("--warmup", type=float, default=20.0, help="Seconds of uncounted load first.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the organic request mix.")
    args = ap.parse_args()
    seconds = args.seconds or (120.0 if args.quick else 600.0)
    res = run(seconds, args.clients, args.validators, args.warmup, args.seed, args.quick)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    keys = (
        "validator_overhead_measured",
        "reference_tokens_over_node_tokens",
        "reference_cpu_over_node_cpu",
        "goal",
        "overhead",
        "rates",
        "id_check",
    )
    print(json.dumps({k: res[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()

"""Discrete-event simulation of a heterogeneous fleet, routed by baselines and by meritnet's Router.

    python -m benchmarks.fleet --out FILE.json [--quick] [--scenario FILE.yaml]

The meritnet policy is the real `routing.router.Router` built from deploy/profiles/default.yaml
and driven exactly as the gateway drives it (update_nodes / update_quality from "background"
events, route / begin / end / observe_success / observe_failure / timeout_s per attempt), on
the simulation's clock. Every policy sees the same registry view (liveness with a lag), gets
the same arrivals, lengths and failures (same seed), retries before the first byte on another
node (up to max_attempts) and never learns a node's true quality: only meritnet reads the
validators' scores, which reveal cheaters after `detect_delay_s`.

The oracles (`oracle-least-loaded`, `oracle-power-of-two`) know every node's true honesty from
the start and route over honest nodes only: not deployable, they are the bar for meritnet (what
the honest fleet can do with a simple load balancer).

Node model: `capacity` slots; a request in a slot prefills at speed x base_prefill_tok_s and
decodes at speed x base_decode_tok_s tokens/s; requests beyond capacity wait FIFO. Each node
keeps a KV prefix cache (an LRU of `cache_blocks_per_slot` x capacity block hashes, chained so a
block stands for its whole prefix): the leading blocks of a prompt it still holds skip prefill,
as with vLLM's automatic prefix caching; a crash empties it. Scenarios may start a fraction of
prompts with one of `shared_prefixes` shared system prompts. A failed
node either crashes (attempts fail after crash_fail_s; the registry marks it not live after
liveness_lag_s) or hangs (attempts time out); requests on it when it fails are lost (counted
in `failed`, they passed their first byte).

Per policy: p50_ms / p99_ms of end-to-end latency of requests arriving after warm-up
(requests still unfinished at the end count with their age, a lower bound, so a policy cannot
look fast by never finishing), goodput_tok_s (output tokens completed by honest nodes per
second after warm-up), dishonest_share (fraction of completed post-warm-up requests served by
dishonest nodes), plus ttft_p50_ms / ttft_p99_ms, completed, failed, unfinished and
offered_tok_s (output tokens/s of the post-warm-up arrivals: no policy's goodput can exceed it,
so goodput / round-robin's goodput is bounded by offered / round-robin's). The arrival rate is a
fraction (load_min..load_max, a sine) of the *honest* nodes' capacity: dishonest capacity is
not useful capacity. `timeline` per policy: [arrival bucket start s, p50 ms, p99 ms] of the
post-warm-up requests (plot with benchmarks.plot_fleet). A PNG of the results is written next to
the JSON.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress

from cluster.records import NodeStats
from routing.router import NoEligibleNode, RequestFacts, Router

MODEL = "default"
OPERATOR = to_checksum_address("0x" + "33" * 20)
DEFAULT_SCENARIO = Path(__file__).parent / "scenarios" / "default.yaml"


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="Accelerator name.")
    speed: float = Field(gt=0, description="Speed multiplier of prefill and decode (1x, 3x, 10x).")
    capacity: int = Field(ge=1, description="Concurrent sequences (slots).")
    share: float = Field(gt=0, description="Fraction of nodes in this tier.")


class Scenario(BaseModel):
    """A fleet and its traffic; see benchmarks/scenarios/default.yaml for values and units."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = Field(description="Seed of fleet, traffic and failures (same for every policy).")
    nodes: int = Field(ge=2, description="Number of nodes.")
    tiers: list[Tier] = Field(min_length=1, description="Speed tiers.")
    base_decode_tok_s: float = Field(gt=0, description="Per-sequence decode tokens/s on a 1x node.")
    base_prefill_tok_s: float = Field(gt=0, description="Prefill tokens/s on a 1x node.")
    dishonest_fraction: float = Field(ge=0, le=1, description="Fraction of dishonest nodes.")
    honest_quality: tuple[float, float] = Field(description="Uniform range of honest nodes' quality.")
    dishonest_quality: tuple[float, float] = Field(description="Uniform range of dishonest nodes' quality.")
    masked_quality: tuple[float, float] = Field(description="Quality validators believe before detection.")
    score_delay_s: float = Field(ge=0, description="When validators first score every node.")
    detect_delay_s: float = Field(ge=0, description="When dishonest nodes' true quality becomes known.")
    load_min: float = Field(gt=0, description="Lowest arrival rate, fraction of honest capacity.")
    load_max: float = Field(gt=0, description="Highest arrival rate, fraction of honest capacity.")
    load_period_s: float = Field(gt=0, description="Period of the load sine.")
    prompt_median: float = Field(gt=0, description="Median prompt tokens (lognormal).")
    prompt_sigma: float = Field(ge=0, description="Lognormal sigma of prompt tokens.")
    prompt_max: int = Field(ge=1, description="Prompt token cap.")
    output_median: float = Field(gt=0, description="Median output tokens (lognormal).")
    output_sigma: float = Field(ge=0, description="Lognormal sigma of output tokens.")
    output_max: int = Field(ge=1, description="Output token cap.")
    session_fraction: float = Field(ge=0, le=1, description="Fraction of requests with a session key.")
    sessions: int = Field(ge=1, description="Number of distinct sessions.")
    mtbf_s: float = Field(gt=0, description="Mean time between a node's failures.")
    mean_down_s: float = Field(gt=0, description="Mean failure duration.")
    hang_fraction: float = Field(ge=0, le=1, description="Fraction of failures that hang instead of crash.")
    crash_fail_s: float = Field(gt=0, description="How fast an attempt on a crashed node fails.")
    liveness_lag_s: float = Field(ge=0, description="Registry delay to mark a crashed node not live.")
    max_attempts: int = Field(ge=1, description="Attempts per request (retries before the first byte).")
    first_byte_timeout_s: float = Field(gt=0, description="Baselines' fixed first-byte timeout.")
    duration_s: float = Field(gt=0, description="Arrivals stop after this (full run).")
    quick_duration_s: float = Field(gt=0, description="Arrivals stop after this with --quick.")
    warmup_s: float = Field(ge=0, description="Measurements start here.")
    drain_s: float = Field(ge=0, description="Extra time to let requests finish after arrivals stop.")
    # KV prefix cache (vLLM's automatic prefix caching): full prompt blocks whose whole prefix a node
    # still holds skip prefill. Defaults keep older scenario files valid.
    block_tokens: int = Field(default=16, ge=1, description="Tokens per KV cache block (vLLM: 16).")
    cache_blocks_per_slot: int = Field(
        default=256, ge=0, description="KV cache blocks per slot of a node, LRU (0: no prefix cache)."
    )
    shared_prefix_fraction: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of requests that start with a shared system prompt."
    )
    shared_prefixes: int = Field(default=1, ge=1, description="Number of distinct shared system prompts.")
    shared_prefix_tokens: int = Field(default=0, ge=0, description="Tokens of each shared system prompt.")
    router_blocks: int = Field(
        default=64,
        ge=0,
        description="Leading blocks whose hashes the router sees (it hashes a bounded prefix).",
    )


# ---- the fleet -------------------------------------------------------------------------------
@dataclass
class Node:
    node_id: str
    tier: Tier
    honest: bool
    quality: float  # true quality
    masked: float  # what validators believe before detection
    state: str = "up"  # up | crash | hang
    live: bool = True  # the registry's view
    active: int = 0
    queue: list = field(default_factory=list)
    cache: OrderedDict = field(default_factory=OrderedDict)  # block hash -> None, LRU order


def cached_blocks(node: Node, blocks: tuple[int, ...]) -> int:
    """Leading blocks of `blocks` the node holds (a block counts only if every block before it does,
    because a block's KV depends on the whole prefix: vLLM chains block hashes the same way)."""
    hit = 0
    for b in blocks:
        if b not in node.cache:
            break
        hit += 1
    return hit


def touch_blocks(node: Node, blocks: tuple[int, ...], limit: int) -> None:
    """The node computed (or reused) `blocks`: most recently used now; evict the oldest beyond limit."""
    cache = node.cache
    for b in blocks:
        if b in cache:
            cache.move_to_end(b)
        else:
            cache[b] = None
    while len(cache) > limit:
        cache.popitem(last=False)


@dataclass(eq=False)
class Req:
    rid: int
    arrival: float
    prompt: int
    output: int
    facts: RequestFacts
    blocks: tuple[int, ...] = ()  # hashes of the prompt's full KV blocks, chained (see cached_blocks)
    tried: set = field(default_factory=set)
    node: Node | None = None
    attempt_start: float = 0.0
    first_byte: float | None = None
    done: bool = False
    in_slot: bool = False
    epoch: int = 0  # bumps per attempt, so stale timeout events are ignored


def build_fleet(sc: Scenario, rng: random.Random) -> list[Node]:
    tiers = []
    for t in sc.tiers:
        tiers += [t] * round(t.share / sum(x.share for x in sc.tiers) * sc.nodes)
    tiers = (tiers + [sc.tiers[-1]] * sc.nodes)[: sc.nodes]
    dishonest = set(rng.sample(range(sc.nodes), round(sc.dishonest_fraction * sc.nodes)))
    return [
        Node(
            f"node-{i}",
            t,
            i not in dishonest,
            rng.uniform(*(sc.dishonest_quality if i in dishonest else sc.honest_quality)),
            rng.uniform(*sc.masked_quality),
        )
        for i, t in enumerate(tiers)
    ]


def honest_capacity_req_s(sc: Scenario, fleet: list[Node]) -> float:
    """Requests/s the honest nodes sustain at 100% slot use (mean service time from the lognormals,
    ignoring the caps, a slight overestimate of the mean length; no prefix cache hits)."""
    # Shared system prompts count in full: this is the capacity without any prefix cache hit.
    mean_p = (
        sc.prompt_median * math.exp(sc.prompt_sigma**2 / 2)
        + sc.shared_prefix_fraction * sc.shared_prefix_tokens
    )
    mean_o = sc.output_median * math.exp(sc.output_sigma**2 / 2)
    total = 0.0
    for n in fleet:
        if n.honest:
            s = n.tier.speed
            total += n.tier.capacity / (
                mean_p / (s * sc.base_prefill_tok_s) + mean_o / (s * sc.base_decode_tok_s)
            )
    return total


# ---- policies --------------------------------------------------------------------------------
class Baseline:
    """Common bookkeeping of the baselines: the registry's live set, their own in-flight counts."""

    name = ""

    def __init__(self, sc: Scenario, fleet: list[Node], rng: random.Random) -> None:
        self.sc, self.rng = sc, rng
        self.cap = {n.node_id: n.tier.capacity for n in fleet}
        self.live = [n.node_id for n in fleet]
        self.inflight = {n.node_id: 0 for n in fleet}

    def update(self, fleet: list[Node], now: float) -> None:
        self.live = [n.node_id for n in fleet if n.live]

    def quality(self, scores: dict[str, float]) -> None:
        pass

    def candidates(self, exclude: set) -> list[str]:
        return [i for i in self.live if i not in exclude]

    def begin(self, nid: str) -> None:
        self.inflight[nid] += 1

    def end(self, nid: str) -> None:
        self.inflight[nid] -= 1

    def success(self, nid: str, ttft: float, tpot: float) -> None:
        pass

    def failure(self, nid: str, now: float) -> None:
        pass

    def timeout(self, nid: str) -> float:
        return self.sc.first_byte_timeout_s


class RandomPolicy(Baseline):
    name = "random"

    def pick(self, req: Req, now: float) -> str | None:
        c = self.candidates(req.tried)
        return self.rng.choice(c) if c else None


class RoundRobin(Baseline):
    name = "round-robin"
    _next = 0

    def pick(self, req: Req, now: float) -> str | None:
        c = self.candidates(req.tried)
        if not c:
            return None
        self._next += 1
        return c[self._next % len(c)]


class LeastLoaded(Baseline):
    name = "least-loaded"

    def pick(self, req: Req, now: float) -> str | None:
        c = self.candidates(req.tried)
        if not c:
            return None
        best = min(self.inflight[i] / self.cap[i] for i in c)
        return self.rng.choice([i for i in c if self.inflight[i] / self.cap[i] == best])


class PowerOfTwo(Baseline):
    name = "power-of-two"

    def pick(self, req: Req, now: float) -> str | None:
        c = self.candidates(req.tried)
        if len(c) < 2:
            return c[0] if c else None
        a, b = self.rng.sample(c, 2)
        la, lb = self.inflight[a] / self.cap[a], self.inflight[b] / self.cap[b]
        return a if la < lb or (la == lb and self.rng.random() < 0.5) else b


class OracleLeastLoaded(LeastLoaded):
    """Least-loaded over the honest nodes only, known from the start (no detection delay): the bar.
    It cannot be deployed (nobody knows honesty up front); it shows what the honest fleet can do."""

    name = "oracle-least-loaded"

    def update(self, fleet: list[Node], now: float) -> None:
        self.live = [n.node_id for n in fleet if n.live and n.honest]


class OraclePowerOfTwo(PowerOfTwo):
    """Power-of-two choices over the honest nodes only, known from the start."""

    name = "oracle-power-of-two"

    def update(self, fleet: list[Node], now: float) -> None:
        self.live = [n.node_id for n in fleet if n.live and n.honest]


class Meritnet:
    """The real Router, fed the way the gateway feeds it."""

    name = "meritnet"

    def __init__(self, sc: Scenario, fleet: list[Node], rng: random.Random, clock, profile=None) -> None:
        self.router = Router.from_yaml(profile, clock=clock, rng=rng)
        self.joined = 0.0

    def update(self, fleet: list[Node], now: float) -> None:
        self.router.update_nodes(
            [
                NodeStats(
                    node_id=n.node_id,
                    model_id=MODEL,
                    operator=OPERATOR,
                    accelerator_type=n.tier.name,
                    capacity=n.tier.capacity,
                    live=n.live,
                    running_replicas=1 if n.live else 0,
                    joined_at=self.joined,
                )
                for n in fleet
            ]
        )

    def quality(self, scores: dict[str, float]) -> None:
        self.router.update_quality(scores)

    def pick(self, req: Req, now: float) -> str | None:
        try:
            return self.router.route(req.facts, exclude=frozenset(req.tried)).node_id
        except NoEligibleNode:
            return None

    def begin(self, nid: str) -> None:
        self.router.begin(nid)

    def end(self, nid: str) -> None:
        self.router.end(nid)

    def success(self, nid: str, ttft: float, tpot: float) -> None:
        self.router.observe_success(nid, ttft, tpot)

    def failure(self, nid: str, now: float) -> None:
        self.router.observe_failure(nid, now)

    def timeout(self, nid: str) -> float:
        return self.router.timeout_s(nid)


BASELINES = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobin, LeastLoaded, PowerOfTwo, OracleLeastLoaded, OraclePowerOfTwo)
}
POLICIES = (*BASELINES, "meritnet")


# ---- the simulation --------------------------------------------------------------------------
class Sim:
    def __init__(self, sc: Scenario, policy_name: str, duration: float, profile: str | None = None) -> None:
        self.sc, self.duration = sc, duration
        self.end_time = duration + sc.drain_s
        self.now = 0.0
        self.fleet = build_fleet(sc, random.Random(sc.seed))
        self.by_id = {n.node_id: n for n in self.fleet}
        prng = random.Random(sc.seed + 1)  # the policy's own randomness
        if policy_name not in POLICIES:
            raise ValueError(f"unknown policy {policy_name!r}; known: {', '.join(POLICIES)}")
        cls = BASELINES.get(policy_name)
        self.policy = (
            cls(sc, self.fleet, prng) if cls else Meritnet(sc, self.fleet, prng, lambda: self.now, profile)
        )
        self.policy.update(self.fleet, 0.0)
        self.events: list = []
        self.seq = 0
        self.lat, self.ttft, self.completed, self.failed = [], [], 0, 0
        self.series: list[tuple[float, float]] = []  # (arrival, end-to-end latency) for the timeline
        self.good_tokens, self.served_dishonest, self.served_after = 0, 0, 0
        self.pending: dict[int, Req] = {}
        self.offered_tokens = 0  # output tokens of post-warm-up arrivals: the goodput ceiling

    def at(self, t: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, args))

    def schedule_world(self) -> None:
        """Arrivals, failures and score updates, from their own seeded streams (policy-independent)."""
        sc = self.sc
        arng, frng = random.Random(sc.seed + 2), random.Random(sc.seed + 3)
        lam_max = sc.load_max * honest_capacity_req_s(sc, self.fleet)
        mid, amp = (sc.load_max + sc.load_min) / 2, (sc.load_max - sc.load_min) / 2
        t, rid = 0.0, 0
        srng = random.Random(
            sc.seed + 4
        )  # shared prefixes: own stream, so older scenarios keep their arrivals
        bt, fresh = sc.block_tokens, 1 << 62  # block ids >= 2**62 are never shared
        shared_blocks = sc.shared_prefix_tokens // bt
        while True:
            t += arng.expovariate(lam_max)
            if t >= self.duration:
                break
            rho = mid + amp * math.sin(2 * math.pi * t / sc.load_period_s)
            u, prompt, output = (
                arng.random(),
                arng.lognormvariate(0, sc.prompt_sigma),
                arng.lognormvariate(0, sc.output_sigma),
            )
            session = f"s{arng.randrange(sc.sessions)}" if arng.random() < sc.session_fraction else None
            prefix = f"{arng.getrandbits(64):016x}"
            if u * sc.load_max > rho:  # thinning: keep with probability rho / load_max
                continue
            p = min(sc.prompt_max, max(1, round(sc.prompt_median * prompt)))
            o = min(sc.output_max, max(1, round(sc.output_median * output)))
            blocks: tuple[int, ...] = ()
            if sc.shared_prefix_tokens and srng.random() < sc.shared_prefix_fraction:
                sys_id = srng.randrange(sc.shared_prefixes)
                prefix = f"sys{sys_id}"
                p += sc.shared_prefix_tokens
                blocks = tuple(((sys_id + 1) << 32) | i for i in range(shared_blocks))
            own = p // bt - len(blocks)
            blocks += tuple(range(fresh, fresh + own))
            fresh += own
            rid += 1
            facts = RequestFacts(MODEL, p, prefix, session, prefix_blocks=blocks[: sc.router_blocks])
            self.at(t, self.arrive, Req(rid, t, p, o, facts, blocks))
            if t >= sc.warmup_s:
                self.offered_tokens += o
        for n in self.fleet:
            t = frng.expovariate(1 / sc.mtbf_s)
            while t < self.end_time:
                down = frng.expovariate(1 / sc.mean_down_s)
                kind = "hang" if frng.random() < sc.hang_fraction else "crash"
                self.at(t, self.node_down, n, kind)
                self.at(t + down, self.node_up, n)
                t += down + frng.expovariate(1 / sc.mtbf_s)
        believed = {n.node_id: (n.quality if n.honest else n.masked) for n in self.fleet}
        self.at(sc.score_delay_s, self.policy.quality, believed)
        self.at(sc.detect_delay_s, self.policy.quality, {n.node_id: n.quality for n in self.fleet})

    # -- requests
    def arrive(self, req: Req) -> None:
        self.pending[req.rid] = req
        self.dispatch(req)

    def dispatch(self, req: Req) -> None:
        if len(req.tried) >= self.sc.max_attempts:
            return self.give_up(req)
        nid = self.policy.pick(req, self.now)
        if nid is None:
            return self.give_up(req)
        node = self.by_id[nid]
        req.tried.add(nid)
        req.node, req.attempt_start, req.first_byte = node, self.now, None
        req.epoch += 1
        self.policy.begin(nid)
        if node.state == "crash":
            self.at(self.now + self.sc.crash_fail_s, self.attempt_failed, req, req.epoch)
            return
        self.at(self.now + self.policy.timeout(nid), self.check_timeout, req, req.epoch)
        if node.state == "hang":
            return  # nothing will ever come back
        if node.active < node.tier.capacity:
            self.start(node, req)
        else:
            node.queue.append(req)

    def start(self, node: Node, req: Req) -> None:
        node.active += 1
        req.in_slot = True
        s, sc = node.tier.speed, self.sc
        prefill = req.prompt
        if sc.cache_blocks_per_slot:  # prefix cache: skip the leading blocks the node still holds
            prefill = max(1, prefill - cached_blocks(node, req.blocks) * sc.block_tokens)
            touch_blocks(node, req.blocks, sc.cache_blocks_per_slot * node.tier.capacity)
        req.first_byte = self.now + prefill / (s * sc.base_prefill_tok_s)
        self.at(req.first_byte + req.output / (s * self.sc.base_decode_tok_s), self.finish, req, req.epoch)

    def free_slot(self, node: Node) -> None:
        node.active -= 1
        while node.queue and node.active < node.tier.capacity:
            nxt = node.queue.pop(0)
            if not nxt.done and nxt.node is node:
                self.start(node, nxt)

    def finish(self, req: Req, epoch: int) -> None:
        if req.epoch != epoch or req.done:
            return
        node = req.node
        req.in_slot = False
        self.free_slot(node)
        self.policy.end(node.node_id)
        ttft = req.first_byte - req.attempt_start
        self.policy.success(node.node_id, ttft, (self.now - req.first_byte) / req.output)
        req.done = True
        del self.pending[req.rid]
        self.completed += 1
        if req.arrival >= self.sc.warmup_s:
            self.lat.append(self.now - req.arrival)
            self.series.append((req.arrival, self.now - req.arrival))
            self.ttft.append(req.first_byte - req.arrival)
            self.served_after += 1
            self.served_dishonest += not node.honest
        if node.honest and self.sc.warmup_s <= self.now <= self.duration:
            self.good_tokens += req.output

    def check_timeout(self, req: Req, epoch: int) -> None:
        if req.epoch != epoch or req.done or (req.first_byte is not None and req.first_byte <= self.now):
            return
        node = req.node
        if req.in_slot:  # in prefill: give the slot back
            req.in_slot = False
            self.free_slot(node)
        elif req in node.queue:
            node.queue.remove(req)
        self.attempt_failed(req, epoch)

    def attempt_failed(self, req: Req, epoch: int) -> None:
        if req.epoch != epoch or req.done:
            return
        self.policy.end(req.node.node_id)
        self.policy.failure(req.node.node_id, self.now)
        req.epoch += 1
        self.dispatch(req)

    def give_up(self, req: Req) -> None:
        req.done = True
        self.pending.pop(req.rid, None)
        self.failed += 1

    # -- nodes
    def node_down(self, node: Node, kind: str) -> None:
        node.state = kind
        lost = [r for r in self.pending.values() if r.node is node and not r.done]
        for r in lost:
            if r.first_byte is not None and r.first_byte <= self.now:  # mid-stream: lost, no retry
                self.policy.end(node.node_id)
                self.policy.failure(node.node_id, self.now)
                self.give_up(r)
            elif kind == "crash":  # before the first byte: the caller sees an error and retries
                r.epoch += 1
                self.at(self.now + self.sc.crash_fail_s, self.attempt_failed, r, r.epoch)
            else:  # a hang: nothing comes back; the attempt waits for its timeout
                r.epoch += 1
                when = max(self.now, r.attempt_start + self.policy.timeout(node.node_id))
                self.at(when, self.check_timeout, r, r.epoch)
            r.in_slot = False
        node.active, node.queue = 0, []
        if kind == "crash":  # the engine restarts with an empty KV cache
            node.cache.clear()
            self.at(self.now + self.sc.liveness_lag_s, self.set_live, node, False)

    def node_up(self, node: Node) -> None:
        node.state = "up"
        if not node.live:
            self.at(self.now + self.sc.liveness_lag_s, self.set_live, node, True)

    def set_live(self, node: Node, live: bool) -> None:
        if live == (node.state != "crash"):
            node.live = live
            self.policy.update(self.fleet, self.now)

    def run(self, progress=None, task=None) -> dict:
        self.schedule_world()
        last = 0.0
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            if t > self.end_time:
                break
            self.now = t
            fn(*args)
            if progress is not None and t - last > 5:
                progress.update(task, completed=t)
                last = t
        for r in self.pending.values():  # unfinished: their age is a lower bound of their latency
            if r.arrival >= self.sc.warmup_s:
                self.lat.append(self.end_time - r.arrival)
                self.series.append((r.arrival, self.end_time - r.arrival))
        return self.report()

    def report(self) -> dict:
        def pct(xs: list[float], q: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)

        window = self.duration - self.sc.warmup_s
        return {
            "p50_ms": pct(self.lat, 0.50),
            "p99_ms": pct(self.lat, 0.99),
            "goodput_tok_s": round(self.good_tokens / window, 1),
            "dishonest_share": round(self.served_dishonest / max(1, self.served_after), 5),
            "ttft_p50_ms": pct(self.ttft, 0.50),
            "ttft_p99_ms": pct(self.ttft, 0.99),
            "completed": self.completed,
            "failed": self.failed,
            "unfinished": len(self.pending),
            "offered_tok_s": round(self.offered_tokens / window, 1),
            "timeline": self.timeline(),
        }

    def timeline(self, bucket_s: float = 30.0) -> list[list[float | None]]:
        """[bucket start (s), p50 ms, p99 ms] of end-to-end latency by arrival time, for the plot."""
        buckets: dict[int, list[float]] = {}
        for t, lat in self.series:
            buckets.setdefault(int(t // bucket_s), []).append(lat)
        out = []
        for k in sorted(buckets):
            xs = sorted(buckets[k])
            out.append(
                [k * bucket_s, round(1000 * xs[len(xs) // 2], 1), round(1000 * xs[int(0.99 * len(xs))], 1)]
            )
        return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], [results[n]["p50_ms"] / 1000 for n in names], 0.4, label="p50")
    axes[0].bar([i + 0.2 for i in x], [results[n]["p99_ms"] / 1000 for n in names], 0.4, label="p99")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("end-to-end latency (s, log)")
    axes[0].legend()
    axes[1].bar(x, [results[n]["goodput_tok_s"] for n in names], color="tab:green")
    axes[1].set_ylabel("goodput (honest output tokens/s)")
    axes[2].bar(x, [100 * results[n]["dishonest_share"] for n in names], color="tab:red")
    axes[2].axhline(1.0, color="k", ls="--", lw=1)
    axes[2].set_ylabel("served by dishonest nodes (%)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path (the PNG goes next to it)")
    ap.add_argument("--quick", action="store_true", help="shorter run (quick_duration_s), same keys")
    ap.add_argument("--scenario", default=str(DEFAULT_SCENARIO), help="scenario YAML")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset (default: all)")
    ap.add_argument(
        "--profile", default=None, help="meritnet's routing YAML (default: deploy/profiles/default.yaml)"
    )
    args = ap.parse_args()
    sc = Scenario.model_validate(yaml.safe_load(Path(args.scenario).read_text()))
    duration = sc.quick_duration_s if args.quick else sc.duration_s
    results: dict = {}
    with Progress() as progress:
        for name in args.policies.split(","):
            task = progress.add_task(name, total=duration + sc.drain_s)
            results[name] = Sim(sc, name, duration, args.profile).run(progress, task)
            progress.update(task, completed=duration + sc.drain_s)
    fleet = build_fleet(sc, random.Random(sc.seed))
    out = Path(args.out)
    doc = {
        "policies": results,
        "scenario": args.scenario,
        "quick": args.quick,
        "duration_s": duration,
        "honest_capacity_req_s": round(honest_capacity_req_s(sc, fleet), 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
    }
    out.write_text(json.dumps(doc, indent=2))
    plot(results, out.with_suffix(".png"), f"benchmarks.fleet ({Path(args.scenario).name}, {duration:.0f} s)")
    print(
        json.dumps({k: {m: v for m, v in r.items() if m != "timeline"} for k, r in results.items()}, indent=2)
    )


if __name__ == "__main__":
    main()

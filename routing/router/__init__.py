"""The quality-aware router: filters -> weighted scorers -> one picker, plus bans and backoff.

Public surface (everything else is internal):

    router = Router.from_yaml("deploy/profiles/default.yaml", registry=prometheus_registry)
    router.update_nodes(list_of_NodeStats); router.update_quality(QualityScores)   # background
    decision = router.route(RequestFacts(...), exclude=frozenset(tried))           # hot path
    router.begin(node) / router.end(node); router.observe_success(...) / observe_failure(...)

`Router.pick(facts, snapshots, ...)` is the same decision over snapshots you build yourself
(e.g. with `build_snapshot(NodeStats, quality, health_state, in_flight)`).
Every plugin has one implementation, over numpy Columns (columns.py) whatever the fleet size.
Plugin docs: filters.py, scorers.py, pickers.py; config format: config.py; default config:
deploy/profiles/default.yaml.
"""

from routing.router.config import (
    DEFAULT_PROFILE_PATH,
    RouterConfig,
    RouterConfigError,
    build_profiles,
    load_config,
    parse_config,
)
from routing.router.framework import REGISTRY, Filter, PickContext, Picker, Profile, Scorer, register
from routing.router.router import Router, build_snapshot
from routing.router.snapshot import Decision, Explanation, NodeSnapshot, NoEligibleNode, RequestFacts

__all__ = [
    "DEFAULT_PROFILE_PATH",
    "REGISTRY",
    "Decision",
    "Explanation",
    "Filter",
    "NoEligibleNode",
    "NodeSnapshot",
    "PickContext",
    "Picker",
    "Profile",
    "RequestFacts",
    "Router",
    "RouterConfig",
    "RouterConfigError",
    "Scorer",
    "build_profiles",
    "build_snapshot",
    "load_config",
    "parse_config",
    "register",
]

"""Routing configuration: plugins with parameters, profiles that reference them, health settings.

The YAML shape (see deploy/profiles/default.yaml):

    plugins:
      - {name: floor, type: quality-floor, parameters: {floor: 0.5}}
      - {name: quality, type: quality}
      - {name: best, type: max-score}
    profiles:
      - name: organic
        plugins: [{plugin: floor}, {plugin: quality, weight: 3}, {plugin: best}]
    health: {ban_base_s: 1.0, ban_max_s: 60.0}

A profile lists its plugins in order; each reference's kind comes from the plugin's type, so
filters run in the listed order, scorers need a weight, and exactly one picker is allowed.
Every mistake raises `RouterConfigError` with a message that says how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Importing the plugin families registers their types.
from routing.router import filters as _filters  # noqa: F401
from routing.router import pickers as _pickers  # noqa: F401
from routing.router import scorers as _scorers  # noqa: F401
from routing.router.framework import REGISTRY, Filter, Picker, Profile, Scorer


class RouterConfigError(ValueError):
    """The routing configuration is invalid; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginSpec(_Strict):
    name: str = Field(min_length=1, description="Name profiles use to reference this plugin instance.")
    type: str = Field(
        min_length=1, description="Registered plugin type, e.g. 'quality-floor' or 'max-score'."
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="The type's parameters (validated by the type's own Params model)."
    )


class PluginRef(_Strict):
    plugin: str = Field(min_length=1, description="Name of a plugin declared under `plugins`.")
    weight: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Required for scorers (relative weight); not allowed otherwise.",
    )


class ProfileSpec(_Strict):
    name: str = Field(min_length=1, description="Profile name, e.g. 'organic' or 'challenge'.")
    plugins: list[PluginRef] = Field(
        description="Filters in order, scorers with weights, exactly one picker."
    )


class TimeoutSpec(_Strict):
    min_s: float = Field(default=5.0, gt=0, description="Shortest first-byte timeout given to any node.")
    max_s: float = Field(
        default=120.0, gt=0, description="Longest timeout; also used for nodes with no TTFT yet."
    )
    ttft_multiplier: float = Field(
        default=10.0, gt=1, description="Timeout = this x the node's TTFT EWMA, clamped to [min_s, max_s]."
    )


class HealthSpec(_Strict):
    ban_base_s: float = Field(default=1.0, gt=0, description="Ban after the first consecutive failure.")
    ban_max_s: float = Field(default=60.0, gt=0, description="Cap of the doubling ban (base x 2^(streak-1)).")
    ewma_alpha: float = Field(
        default=0.2, gt=0, le=1, description="Weight of the newest TTFT/TPOT sample in the node's EWMAs."
    )
    latency_stale_s: float = Field(
        default=10.0,
        gt=0,
        description="A node's TTFT/TPOT EWMAs with no new sample for this long are forgotten: it scores as "
        "never timed (the latency scorer's `unknown`) until its next request measures it afresh. Without "
        "it, a node whose only sample was slow (a cold first request) would never get traffic again.",
    )
    timeouts: TimeoutSpec = Field(default_factory=TimeoutSpec, description="Per-node first-byte timeouts.")


class RouterConfig(_Strict):
    plugins: list[PluginSpec] = Field(description="Plugin instances with their parameters.")
    profiles: list[ProfileSpec] = Field(description="Routing profiles built from the plugins.")
    organic_profile: str = Field(default="organic", description="Profile used for client traffic.")
    challenge_profile: str = Field(default="challenge", description="Profile used for validator challenges.")
    health: HealthSpec = Field(default_factory=HealthSpec, description="Bans, backoff, EWMAs and timeouts.")
    seed: int | None = Field(default=None, description="Seed of the router's randomness (None: from the OS).")


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate a routing YAML file (structure only; `build_profiles` checks references)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RouterConfigError(f"routing config {path} does not exist; pass an existing YAML path") from None
    except yaml.YAMLError as exc:
        raise RouterConfigError(f"routing config {path} is not valid YAML: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "<config>") -> RouterConfig:
    if not isinstance(raw, dict):
        raise RouterConfigError(f"{source}: the top level must be a mapping with 'plugins' and 'profiles'")
    try:
        cfg = RouterConfig.model_validate(raw)
    except ValidationError as exc:
        lines = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RouterConfigError(
            f"{source}: {lines}. See deploy/profiles/default.yaml for a valid example"
        ) from None
    build_profiles(cfg)  # reject bad references now, not on the first request
    return cfg


def build_profiles(cfg: RouterConfig) -> dict[str, Profile]:
    """Instantiate every plugin once and compile each profile; raises RouterConfigError."""
    instances = _instantiate(cfg.plugins)
    profiles: dict[str, Profile] = {}
    for prof in cfg.profiles:
        if prof.name in profiles:
            raise RouterConfigError(f"profile {prof.name!r} is declared twice; rename or merge one of them")
        profiles[prof.name] = _compile(prof, instances)
    for role in ("organic_profile", "challenge_profile"):
        name = getattr(cfg, role)
        if name not in profiles:
            raise RouterConfigError(
                f"{role} is {name!r} but no profile has that name; define it or set {role} to one of: "
                f"{', '.join(sorted(profiles))}"
            )
    return profiles


def _instantiate(specs: list[PluginSpec]) -> dict[str, Filter | Scorer | Picker]:
    """One instance per declared plugin, by name, its parameters validated by its type."""
    instances = {}
    for spec in specs:
        if spec.name in instances:
            raise RouterConfigError(
                f"plugin name {spec.name!r} is declared twice; give each plugin instance a unique name"
            )
        cls = REGISTRY.get(spec.type)
        if cls is None:
            raise RouterConfigError(
                f"plugin {spec.name!r} has unknown type {spec.type!r}; known types: {', '.join(sorted(REGISTRY))}"
            )
        try:
            params = cls.Params.model_validate(spec.parameters)
        except ValidationError as exc:
            valid = ", ".join(cls.Params.model_fields) or "none"
            lines = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RouterConfigError(
                f"plugin {spec.name!r} (type {spec.type}) has bad parameters: {lines}. Valid parameters: {valid}"
            ) from None
        instances[spec.name] = cls(spec.name, params)
    return instances


def _compile(prof: ProfileSpec, instances: dict[str, Filter | Scorer | Picker]) -> Profile:
    """A profile's references resolved: filters in order, scorers with their weights, one picker."""
    fs, ss, ps = [], [], []
    for ref in prof.plugins:
        plugin = instances.get(ref.plugin)
        if plugin is None:
            raise RouterConfigError(
                f"profile {prof.name!r} references unknown plugin {ref.plugin!r}; declare it under "
                f"'plugins' or use one of: {', '.join(sorted(instances)) or '(none declared)'}"
            )
        if isinstance(plugin, Scorer):
            if ref.weight is None:
                raise RouterConfigError(
                    f"profile {prof.name!r}: scorer {ref.plugin!r} has no weight; add e.g. 'weight: 1'"
                )
            ss.append((plugin, ref.weight))
            continue
        if ref.weight is not None:
            raise RouterConfigError(
                f"profile {prof.name!r}: {plugin.kind} {ref.plugin!r} cannot take a weight (only scorers "
                "do); remove 'weight'"
            )
        (fs if isinstance(plugin, Filter) else ps).append(plugin)
    if len(ps) != 1:
        found = ", ".join(p.name for p in ps) or "none"
        raise RouterConfigError(
            f"profile {prof.name!r} must list exactly one picker, found {len(ps)} ({found}); "
            "keep one of max-score, weighted-random, power-of-two"
        )
    if ss and sum(w for _, w in ss) <= 0:
        raise RouterConfigError(f"profile {prof.name!r}: scorer weights sum to 0; give one a positive weight")
    assert isinstance(ps[0], Picker)
    return Profile(prof.name, fs, ss, ps[0])


DEFAULT_PROFILE_PATH = Path(__file__).resolve().parents[2] / "deploy" / "profiles" / "default.yaml"

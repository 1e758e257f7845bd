"""The routing config loader: the default file loads; each mistake is rejected with a how-to-fix message."""

from __future__ import annotations

import copy

import pytest

from routing.router import DEFAULT_PROFILE_PATH, RouterConfigError, load_config, parse_config

BASE = {
    "plugins": [
        {"name": "live", "type": "live"},
        {"name": "quality", "type": "quality"},
        {"name": "best", "type": "max-score"},
    ],
    "profiles": [
        {
            "name": "organic",
            "plugins": [{"plugin": "live"}, {"plugin": "quality", "weight": 1}, {"plugin": "best"}],
        },
        {"name": "challenge", "plugins": [{"plugin": "live"}, {"plugin": "best"}]},
    ],
}


def with_(mutate):
    raw = copy.deepcopy(BASE)
    mutate(raw)
    return raw


def test_default_profile_file_loads_with_both_profiles():
    cfg = load_config(DEFAULT_PROFILE_PATH)
    assert {p.name for p in cfg.profiles} >= {"organic", "challenge"}


def test_minimal_config_parses():
    assert parse_config(BASE).organic_profile == "organic"


BAD = [
    (
        lambda r: r["plugins"].append({"name": "x", "type": "no-such-type"}),
        "unknown type 'no-such-type'.*known types",
    ),
    (lambda r: r["plugins"].append({"name": "live", "type": "live"}), "declared twice.*unique name"),
    (lambda r: r["profiles"][0]["plugins"].append({"plugin": "ghost"}), "unknown plugin 'ghost'.*declare it"),
    (lambda r: r["profiles"][0]["plugins"][1].pop("weight"), "scorer 'quality' has no weight.*weight: 1"),
    (lambda r: r["profiles"][0]["plugins"][0].update(weight=2), "filter 'live' cannot take a weight"),
    (lambda r: r["profiles"][0]["plugins"].pop(), "exactly one picker, found 0"),
    (
        lambda r: (
            r["plugins"].append({"name": "p2", "type": "power-of-two"}),
            r["profiles"][0]["plugins"].append({"plugin": "p2"}),
        ),
        "exactly one picker, found 2",
    ),
    (lambda r: r["profiles"].pop(), "challenge_profile is 'challenge' but no profile"),
    (lambda r: r["profiles"].append(copy.deepcopy(r["profiles"][0])), "profile 'organic' is declared twice"),
    (
        lambda r: r["plugins"].append({"name": "f", "type": "quality-floor", "parameters": {"flor": 0.5}}),
        "bad parameters.*Valid parameters: floor",
    ),
    (
        lambda r: r["plugins"].append({"name": "f", "type": "quality-floor", "parameters": {"floor": 2}}),
        "bad parameters",
    ),
    (lambda r: r.update(surprise=1), "surprise"),
    (lambda r: r["profiles"][0]["plugins"][1].update(weight=0), "weights sum to 0"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_config_is_rejected_with_a_fix(mutate, message):
    with pytest.raises(RouterConfigError, match=message):
        parse_config(with_(mutate))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RouterConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [unclosed")
    with pytest.raises(RouterConfigError, match="not valid YAML"):
        load_config(bad)

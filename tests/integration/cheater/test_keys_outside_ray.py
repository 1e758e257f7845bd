"""The settler's and validators' keys live outside the Ray cluster (issue 28, item 16).

Any code in the cluster, a managed engine's model code included, can enter a named actor with
`__ray_call__`. These tests do exactly that, from this driver (a cluster member like any engine), to
the running settlement actor and a validator: what they hold is a handle with no secret, and the signer
behind it refuses what those actors never sign."""

from __future__ import annotations

import os

import psutil
import pytest

pytestmark = pytest.mark.integration


def _inside(actor, fn):
    import ray

    return ray.get(actor.__ray_call__.remote(fn), timeout=60)


def _attempts(key_attr: str):
    def attempt(self):
        from eth_account import Account

        key = getattr(self, key_attr)
        out = {"type": type(key).__name__, "attrs": sorted(key.__slots__)}
        try:
            key.sign_transaction(
                {"type": 2, "to": Account.create().address, "value": 10**18, "gas": 21_000, "nonce": 0,
                 "maxFeePerGas": 1, "maxPriorityFeePerGas": 1, "chainId": 1}
            )  # fmt: skip
            out["transfer"] = "signed"
        except Exception as exc:  # noqa: BLE001 - the refusal is what is recorded
            out["transfer"] = str(exc)
        return out

    return attempt


def test_the_settlement_actor_holds_no_key_and_cannot_sign_a_transfer(cheater_network):
    import ray

    from cluster import services

    settlement = ray.get_actor(services.SETTLEMENT, namespace=services.NAMESPACE)
    seen = _inside(settlement, _attempts("key"))
    assert seen["type"] == "RemoteSigner" and seen["attrs"] == ["address", "key", "socket_path"], seen
    assert "refused" in seen["transfer"] and "ether" in seen["transfer"], seen


def test_a_validator_signs_reports_as_itself_only(cheater_network):
    from deploy.scoring import validator_actor
    from scoring.report import ScoreReport, typed_data

    v1 = validator_actor("v1")
    seen = _inside(v1, _attempts("_key"))
    assert seen["type"] == "RemoteSigner" and "refused" in seen["transfer"], seen

    forged = typed_data(ScoreReport(validator="v2", round=1, issued_at_ms=1))

    def forge(self):
        try:
            self._key.sign_typed_data(forged)
            return "signed"
        except Exception as exc:  # noqa: BLE001
            return str(exc)

    assert "refused" in _inside(v1, forge)


def test_the_signer_is_no_ray_process_and_its_keys_are_in_no_ray_environment(cheater_network):
    signer = psutil.Process(cheater_network.signer.process.pid)
    ancestors = {p.name() for p in signer.parents()}
    assert not any("raylet" in name or name.startswith("ray::") for name in ancestors), ancestors
    assert signer.parent().pid == os.getpid()  # the driver (`meritnet up`) started it, before Ray
    key_dir = str(cheater_network.config.state_dir)
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] and (p.info["name"].startswith("ray::") or "raylet" in p.info["name"]):
            try:
                env = p.environ()
            except psutil.Error:
                continue
            assert "MERITNET_SETTLER_KEY" not in env, p.info["name"]
            assert not any(key_dir in v and v.endswith(".key") for v in env.values()), p.info["name"]

"""A package's shared LocalNetwork for the integration tests, and the checks of its start that each
package's test_aa_health.py runs."""

from __future__ import annotations


class PackageNetwork:
    """A package's shared LocalNetwork, checked once: its start ends with every node's first request
    (LocalNetwork.check_nodes). A network that fails it is restarted once; if it fails again, the first
    test that asks for it fails with the reason and the engines' log tails, and every later one is
    skipped, so one broken network is one failure, not a cascade of identical 503s.

    Usage: a package's conftest has a package-scoped fixture that yields `PackageNetwork(cfg)` (and calls
    `stop()` after) and a package-scoped `network` fixture that returns its `.get()`; the package's first
    module, test_aa_health.py, calls `.get()` itself, so the failure is reported there once and the
    `network` fixture (cached by pytest for the package) skips."""

    def __init__(self, config, start_timeout_s: float | None = None, attempts: int = 2) -> None:
        from deploy.network import LocalNetwork

        self.net: LocalNetwork | None = None
        self.error: str | None = None
        self._reported = False
        for attempt in range(1, attempts + 1):
            net = LocalNetwork(config)
            try:
                self.net = net.start(timeout_s=start_timeout_s)
                return
            except Exception as exc:  # noqa: BLE001 - any failed start is this package's one failure
                net.stop()
                self.error = (
                    f"the package network failed to start (attempt {attempt} of {attempts}): "
                    f"{type(exc).__name__}: {exc}"
                )
                print(self.error)

    def get(self):
        import pytest

        if self.net is not None:
            return self.net
        if not self._reported:
            self._reported = True
            pytest.fail(self.error, pytrace=False)
        pytest.skip("this package's network failed to start: see the first failure of the package")

    def stop(self) -> None:
        if self.net is not None:
            self.net.stop()


def usage_by_id() -> dict:
    """The running network's usage records by request id (read from its usage store actor)."""
    import ray

    from deploy.usage import USAGE_STORE_NAME

    store = ray.get_actor(USAGE_STORE_NAME, namespace="meritnet")
    return {r.request_id: r for r in ray.get(store.all.remote())}


def assert_first_requests_served(net) -> None:
    """Every managed node of `net` served its first request (LocalNetwork.check_nodes): a completed
    completion of 2 tokens (an embeddings node: one vector, nothing generated), metered, before any other
    record of that node."""
    records = sorted(usage_by_id().values(), key=lambda r: r.started_at)
    for spec in net.specs:
        first = next((r for r in records if r.node_id == spec.node_id), None)
        assert first is not None, f"{spec.node_id} has no usage record: its first request was never served"
        generated = 0 if spec.task == "embed" else 2
        assert (first.status, first.completion_tokens) == ("ok", generated) and first.prompt_tokens > 0, first

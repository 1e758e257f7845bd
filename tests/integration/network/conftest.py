"""One real local network for this package (Ray cluster + two vLLM nodes + gateway), shared.

Package-scoped, so it is shut down before other packages start networks of their own.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import free_port


@pytest.fixture(scope="package")
def network(tmp_path_factory):
    from deploy.config import NetworkConfig
    from deploy.network import LocalNetwork

    cfg = NetworkConfig(
        port=free_port(),
        state_dir=tmp_path_factory.mktemp("meritnet-state"),
        # the lying node (test_lying_node.py) claims model "liar"; the gateway meters it with this tokenizer
        trusted_models={"default": "builtin:default", "liar": "builtin:default"},
    )
    net = LocalNetwork(cfg).start()
    yield net
    net.stop()


@pytest.fixture(scope="package")
def client(network):
    from openai import OpenAI

    return OpenAI(base_url=f"{network.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def usage_records(network):
    """Callable returning the usage ledger's records by request id."""
    import ray

    from deploy.usage import USAGE_STORE_NAME

    store = ray.get_actor(USAGE_STORE_NAME, namespace="meritnet")

    def fetch() -> dict:
        return {r.request_id: r for r in ray.get(store.all.remote())}

    return fetch

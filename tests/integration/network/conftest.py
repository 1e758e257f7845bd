"""One real local network for this package (Ray cluster + two vLLM nodes + gateway), shared.

Package-scoped, so it is shut down before other packages start networks of their own.
"""

from __future__ import annotations

import pytest

from tests.support.package_network import PackageNetwork
from tests.support.ports import free_port


@pytest.fixture(scope="package")
def _package_network(tmp_path_factory):
    from deploy.config import NetworkConfig

    cfg = NetworkConfig(
        port=free_port(),
        state_dir=tmp_path_factory.mktemp("meritnet-state"),
        # the lying nodes (test_lying_node.py) claim model "liar", the operator's node (test_open_node.py)
        # serves "open"; the gateway meters both with this tokenizer
        trusted_models={"default": "builtin:default", "liar": "builtin:default", "open": "builtin:default"},
        # the demo's embeddings model, and the one an operator's embeddings node serves (test_open_embeddings.py)
        embedding_models={"default-embed": "builtin:default", "open-embed": "builtin:default"},
        timeouts={"stream_idle_s": 15},  # a stalled stream ends this soon (test_lying_node.py)
        epoch_length_s=20,  # an open node's traffic is settled this soon (test_open_node.py)
    )
    shared = PackageNetwork(cfg)
    yield shared
    shared.stop()


@pytest.fixture(scope="package")
def network(_package_network):
    """The package's network (test_aa_health.py reports a failed start once; then this skips)."""
    return _package_network.get()


@pytest.fixture(scope="package")
def client(network):
    from openai import OpenAI

    return OpenAI(base_url=f"{network.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def usage_records(network):
    """Callable returning the usage ledger's records by request id."""
    from tests.support.package_network import usage_by_id

    return usage_by_id

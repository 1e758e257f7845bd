"""A network where two of four nodes claiming model "default" cheat: one runs other weights (the seed-1
model), one a 4-bit round-to-nearest quantization of the right weights (cluster.quantize); three
validators (sharing one reference engine) and consensus run. Package-scoped: started once for this
package and shut down before other packages start networks of their own."""

from __future__ import annotations

import pytest

from tests.support.cheater_network import CHEATER, CHEATER_OP, EPOCH_S, HONEST_A, HONEST_B, QUANT, QUANT_OP
from tests.support.package_network import PackageNetwork
from tests.support.ports import free_port


@pytest.fixture(scope="package")
def _cheater_package_network(tmp_path_factory):
    from cluster.model import build_default_model
    from cluster.quantize import quantized_model
    from deploy.config import NetworkConfig

    rate = 40.0  # challenges per node per minute per validator: high, so the test gathers 200+ verifications fast
    cfg = NetworkConfig(
        port=free_port(),
        state_dir=tmp_path_factory.mktemp("cheater-state"),
        epoch_length_s=EPOCH_S,
        consensus_period_s=2.0,
        shadow_rate=0.1,  # 5x the default, so the organic load yields a few dozen shadow verifications
        scoring_metrics_port=free_port(),
        nodes=[
            {"node_id": "h100-a", "operator": HONEST_A, "accelerator_type": "H100"},
            # Honest, but computes differently from the validators' bfloat16 reference (issue 26): float32
            # weights and activations, as another GPU's kernels or precision would.
            {
                "node_id": "l4-b",
                "operator": HONEST_B,
                "accelerator_type": "L4",
                "engine_kwargs": {"dtype": "float32"},
            },
            # Claims "default" (the seed-0 model) but serves the seed-1 model: same architecture and
            # tokenizer, other weights.
            {
                "node_id": CHEATER,
                "operator": CHEATER_OP,
                "accelerator_type": "H100",
                "model_source": "builtin:default@1",
            },
            # Claims "default" and serves it, quantized to 4 bits: the cheat that pays.
            {
                "node_id": QUANT,
                "operator": QUANT_OP,
                "accelerator_type": "L4",
                "model_source": str(quantized_model(build_default_model(0), "int4")),
            },
        ],
        validators=[
            {"validator_id": "v1", "stake": 2.0, "challenges_per_node_per_min": rate},
            {"validator_id": "v2", "stake": 1.0, "challenges_per_node_per_min": rate},
            {"validator_id": "v3", "stake": 1.0, "challenges_per_node_per_min": rate},
        ],
    )
    shared = PackageNetwork(cfg, start_timeout_s=600)
    yield shared
    shared.stop()


@pytest.fixture(scope="package")
def cheater_network(_cheater_package_network):
    """The package's network (test_aa_health.py reports a failed start once; then this skips)."""
    return _cheater_package_network.get()

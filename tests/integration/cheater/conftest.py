"""A network where two of four nodes claiming model "default" cheat: one runs other weights (the seed-1
model), one a 4-bit round-to-nearest quantization of the right weights (cluster.quantize); three
validators (sharing one reference engine) and consensus run. Package-scoped: started once for this
package and shut down before other packages start networks of their own."""

from __future__ import annotations

import pytest

from tests.integration.conftest import free_port

HONEST_A = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
HONEST_B = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
CHEATER_OP = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"  # its own operator, so its reward is observable
HONEST_NODES = ("h100-a", "l4-b")
CHEATER = "h100-c"
QUANT = "l4-q"  # serves the int4 RTN quantization of the claimed model
QUANT_OP = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
EPOCH_S = 30.0


@pytest.fixture(scope="package")
def cheater_network(tmp_path_factory):
    from cluster.model import build_default_model
    from cluster.quantize import quantized_model
    from deploy.config import NetworkConfig
    from deploy.network import LocalNetwork

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
            {"node_id": "l4-b", "operator": HONEST_B, "accelerator_type": "L4"},
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
    net = LocalNetwork(cfg).start(timeout_s=600)
    yield net
    net.stop()

"""Who is who in the cheater package's network (tests/integration/cheater): its conftest starts it,
its tests judge each node by these names."""

from __future__ import annotations

HONEST_A = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
HONEST_B = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
CHEATER_OP = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"  # its own operator, so its reward is observable
HONEST_NODES = ("h100-a", "l4-b")
CHEATER = "h100-c"
QUANT = "l4-q"  # serves the int4 RTN quantization of the claimed model
QUANT_OP = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
EPOCH_S = 30.0

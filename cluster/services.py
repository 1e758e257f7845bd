"""The control plane's named Ray actors, each name and the namespace written once. Every module that
creates one (deploy/) or finds one by name (the gateway's refresher, validators, the CLI) reads it here;
GatewayConfig and the validators keep their names as settings whose defaults are these."""

from __future__ import annotations

NAMESPACE = "meritnet"
REGISTRY = "meritnet-registry"  # cluster/registry.py: nodes, links, open-node admission
USAGE_STORE = "meritnet-usage"  # deploy/usage.py: the durable usage ledger
SETTLEMENT = "meritnet-settlement"  # settlement/actor.py: epochs, rewards, proofs, receipts
CONSENSUS = "meritnet-consensus"  # scoring/consensus_service.py (started by deploy/scoring.py): Yuma
SHADOW_FEED = "meritnet-shadow"  # scoring/shadow_feed.py (started by deploy/scoring.py): organic samples

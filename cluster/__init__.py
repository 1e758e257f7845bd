"""cluster: the shared vocabulary, node deployments, placement, registry and the default model."""

from cluster.records import NodeScore, NodeSpec, NodeStats, QualityScores, UsageRecord, UsageStatus

__all__ = ["NodeScore", "NodeSpec", "NodeStats", "QualityScores", "UsageRecord", "UsageStatus"]

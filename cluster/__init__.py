"""cluster: the shared vocabulary, node deployments, placement, registry and the default model."""

from cluster.records import (
    NodeScore,
    NodeSpec,
    NodeStats,
    QualityScores,
    ServedCompletion,
    UsageRecord,
    UsageStatus,
    keyed_sample,
)

__all__ = [
    "NodeScore",
    "NodeSpec",
    "NodeStats",
    "QualityScores",
    "ServedCompletion",
    "UsageRecord",
    "UsageStatus",
    "keyed_sample",
]

"""scoring: validators that challenge nodes, verify outputs against a reference engine, and reach
consensus (Yuma). Pure logic here; I/O (gateway HTTP, vLLM) is injected. Imports only `cluster`.
"""

from scoring.challenge import ChallengeConfig, ChallengePool, ChallengeRequest, ShadowSampler
from scoring.challenge_client import ChallengeResponse, http_send, parse_completion, parse_stream
from scoring.consensus import ConsensusState, YumaResult, quality_from_consensus, yuma_epoch
from scoring.consensus_service import ConsensusService
from scoring.epoch_quality import EpochQuality
from scoring.score import NodeScorer, ScoreConfig
from scoring.shadow_feed import ShadowFeed
from scoring.shared_engine import ReferenceEngineService
from scoring.thresholds import VerifyThresholds, calibrate
from scoring.validator import Validator, ValidatorConfig
from scoring.verify import Claim, Evidence, ReferenceEngine, TextCodec, Verification, verify

__all__ = [
    "ChallengeConfig",
    "ChallengePool",
    "ChallengeRequest",
    "ChallengeResponse",
    "Claim",
    "ConsensusService",
    "ConsensusState",
    "EpochQuality",
    "Evidence",
    "NodeScorer",
    "ReferenceEngine",
    "ReferenceEngineService",
    "ScoreConfig",
    "ShadowFeed",
    "ShadowSampler",
    "TextCodec",
    "Validator",
    "ValidatorConfig",
    "Verification",
    "VerifyThresholds",
    "YumaResult",
    "calibrate",
    "http_send",
    "parse_completion",
    "parse_stream",
    "quality_from_consensus",
    "verify",
    "yuma_epoch",
]

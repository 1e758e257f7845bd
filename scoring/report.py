"""Signed score reports: how a validator's scores reach consensus, and why consensus can trust them.

Every round the consensus actor asks each configured validator for a report and names the round. The
validator answers with its current `NodeScore`s, that round and the time, signed with its own key
(EIP-712 typed data, eth-account). The consensus actor holds each validator's address from the
network's configuration and accepts a report (`accept_report`) only if

- it is from the validator asked: the report's `validator` and every score's `validator` match;
- its signature recovers to that validator's configured address: another key, or a report changed
  after signing, recovers to a different address;
- it answers this round (an older report cannot be replayed) and was made within `max_age_s` of now.

A refused report counts as no answer: that validator weights nothing this round and keeps its stake
(`scoring.ConsensusState`). The report travels as JSON text and is parsed strictly here, so a score
that is NaN, negative or out of [0, 1] is refused like a bad signature instead of failing the round.

Scores are floats, which EIP-712 has no type for, so the message signs the keccak hash of their
canonical JSON (sorted keys, no spaces; Python writes a float as its shortest round-trip form, so the
same floats always give the same bytes on both sides).
"""

from __future__ import annotations

import json

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.records import NodeScore

DOMAIN = {"name": "meritnet-scores", "version": "1"}
MAX_REPORT_CHARS = 8 << 20  # ~40k nodes' scores; anything larger is refused unparsed
_FIELDS = [
    {"name": "validator", "type": "string"},
    {"name": "round", "type": "uint64"},
    {"name": "issuedAtMs", "type": "uint64"},
    {"name": "scoresHash", "type": "bytes32"},
]
_DOMAIN = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"}]


class ScoreReport(BaseModel):
    """What a validator signs: its current scores, for one consensus round."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    validator: str = Field(min_length=1, max_length=64, description="The reporting validator's id.")
    round: int = Field(ge=0, lt=1 << 64, description="The consensus round that asked for it.")
    issued_at_ms: int = Field(ge=0, lt=1 << 64, description="Unix time of signing, milliseconds.")
    scores: tuple[NodeScore, ...] = Field(default=(), description="The validator's current view.")


class SignedScoreReport(BaseModel):
    """A report and its 65-byte signature; the wire form is `model_dump_json()`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    report: ScoreReport
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$", description="65-byte signature, hex.")


class ReportRefused(ValueError):
    """A report consensus does not count; `reason` labels the refusal metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def scores_hash(scores: tuple[NodeScore, ...]) -> bytes:
    canonical = json.dumps(
        [s.model_dump(mode="json") for s in scores], sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return keccak(text=canonical)


def typed_data(report: ScoreReport) -> dict:
    """The EIP-712 message for `report`."""
    return {
        "types": {"EIP712Domain": _DOMAIN, "ScoreReport": _FIELDS},
        "primaryType": "ScoreReport",
        "domain": DOMAIN,
        "message": {
            "validator": report.validator,
            "round": report.round,
            "issuedAtMs": report.issued_at_ms,
            "scoresHash": scores_hash(report.scores),
        },
    }


def sign_report(report: ScoreReport, key) -> SignedScoreReport:
    """Sign with an eth-account LocalAccount, or anything with its `sign_typed_data` (SettlerKey)."""
    signed = key.sign_typed_data(full_message=typed_data(report))
    return SignedScoreReport(report=report, signature="0x" + bytes(signed.signature).hex())


def accept_report(
    text: str, validator: str, address: str, round_: int, now: float, max_age_s: float
) -> tuple[NodeScore, ...]:
    """The scores of a report (JSON text) that `validator`, whose key is `address`, signed for round
    `round_` at most `max_age_s` before (or after) `now`. Raises ReportRefused otherwise."""
    if not isinstance(text, str) or len(text) > MAX_REPORT_CHARS:
        raise ReportRefused("malformed", "a report is JSON text of bounded size")
    try:
        signed = SignedScoreReport.model_validate_json(text)
    except ValidationError as exc:
        raise ReportRefused("malformed", f"not a score report ({exc.error_count()} errors)") from None
    report = signed.report
    if report.validator != validator or any(s.validator != validator for s in report.scores):
        raise ReportRefused(
            "wrong_validator", f"the report or its scores name another validator than {validator}"
        )
    try:
        signer = Account.recover_message(
            encode_typed_data(full_message=typed_data(report)), signature=bytes.fromhex(signed.signature[2:])
        )
    except Exception:  # noqa: BLE001 - any malformed signature is the same refusal
        signer = None
    if signer != address:
        raise ReportRefused("bad_signature", f"the signature does not recover to {validator}'s address")
    if report.round != round_ or abs(now - report.issued_at_ms / 1000) > max_age_s:
        raise ReportRefused(
            "stale",
            f"made for round {report.round} at {report.issued_at_ms / 1000:.0f}, "
            f"asked for round {round_} at {now:.0f} (max age {max_age_s:.0f} s)",
        )
    return report.scores

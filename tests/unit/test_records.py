"""NodeSpec / UsageRecord validation: bad specs fail at load with a message naming the field."""

import math

import pytest
from pydantic import ValidationError

from cluster import NodeSpec, UsageRecord

OP = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
GOOD = {
    "node_id": "h100-a",
    "operator": OP,
    "model_id": "default",
    "model_source": "/models/x",
    "accelerator_type": "H100",
}


def test_good_spec_has_accelerator_resource():
    spec = NodeSpec(**GOOD)
    assert spec.accelerator_resource == "accel_H100" and spec.replicas == 1


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("operator", OP.lower(), "EIP-55"),
        ("operator", "0x1234", "EIP-55"),
        ("node_id", "Bad Id!", "node id"),
        ("node_id", "", "node id"),
        ("model_id", "", "at least 1"),
        ("accelerator_type", "H 100", "pattern"),
        ("replicas", 0, "greater than or equal"),
        ("capacity", "8", "valid integer"),
    ],
)
def test_bad_spec_names_the_field(field, value, fragment):
    with pytest.raises(ValidationError) as exc:
        NodeSpec(**{**GOOD, field: value})
    err = exc.value.errors()[0]
    assert err["loc"][0] == field and fragment in str(exc.value)


def test_unknown_field_rejected():
    with pytest.raises(ValidationError, match="extra"):
        NodeSpec(**GOOD, gpu="yes")


def test_spec_is_frozen():
    spec = NodeSpec(**GOOD)
    with pytest.raises(ValidationError):
        spec.replicas = 3


def _usage(**kw):
    base = {
        "request_id": "r1",
        "node_id": "n1",
        "operator": OP,
        "model": "default",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "started_at": 1.0,
        "ttft_s": 0.1,
        "ended_at": 2.0,
        "status": "ok",
    }
    return UsageRecord(**{**base, **kw})


@pytest.mark.parametrize(
    "kw", [{"ttft_s": math.nan}, {"started_at": math.inf}, {"prompt_tokens": -1}, {"status": "done"}]
)
def test_usage_record_rejects_nan_negative_and_unknown_status(kw):
    with pytest.raises(ValidationError):
        _usage(**kw)


def test_usage_record_roundtrips_json():
    rec = _usage()
    assert UsageRecord.model_validate_json(rec.model_dump_json()) == rec

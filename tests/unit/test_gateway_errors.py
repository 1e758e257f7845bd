"""Error mapping of the gateway: every failure is an OpenAI-shaped error with the right status."""

import json

import pytest
from pydantic import BaseModel, ValidationError

from routing import errors


class _Req(BaseModel):
    model: str
    max_tokens: int


def _shape(err: errors.APIError) -> dict:
    body = json.loads(err.response().body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_validation_error_names_param():
    with pytest.raises(ValidationError) as exc:
        _Req.model_validate({"model": "m", "max_tokens": "many"})
    err = errors.from_validation_error(exc.value)
    assert err.status == 400 and _shape(err)["param"] == "max_tokens"


@pytest.mark.parametrize(
    "err,status,code",
    [
        (errors.malformed_json("x"), 400, "invalid_json"),
        (errors.unknown_model("m", ["default"]), 404, "model_not_found"),
        (errors.no_live_node("m"), 503, "no_live_node"),
        (errors.upstream_failed("m"), 503, "upstream_failed"),
        (errors.unauthorized(), 401, "invalid_api_key"),
        (errors.not_found("/x"), 404, "not_found"),
    ],
)
def test_status_and_code(err, status, code):
    assert err.status == status and _shape(err)["code"] == code


def test_engine_error_status_is_clamped_to_http_range():
    assert errors.from_engine_error("bad", 0, None).status == 400
    assert errors.from_engine_error("bad", 422, None).status == 422
    assert errors.from_engine_error("boom", 500, None).type == "server_error"


def test_unknown_model_lists_available_models():
    assert "default" in errors.unknown_model("x", ["default"]).message


def test_sse_event_is_one_data_line():
    ev = errors.stream_interrupted().sse_event().decode()
    assert (
        ev.startswith("data: ")
        and ev.endswith("\n\n")
        and json.loads(ev[6:])["error"]["type"] == "server_error"
    )

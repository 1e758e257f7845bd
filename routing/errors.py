"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status.

Every way a request can fail maps to one of these, so clients (and the official `openai`
package) always get an error they can read, never a stack trace or a bare 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.responses import Response

from cluster import sse
from cluster.completions import NodeError


@dataclass(eq=False)  # not frozen: raising sets __traceback__ on the instance
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None  # a 429's Retry-After (whole seconds, rounded up)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> Response:
        if self.retry_after_s is not None:
            headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return Response(
            json.dumps(self.body()), status_code=self.status, media_type="application/json", headers=headers
        )

    def sse_event(self) -> bytes:
        """The error as a final server-sent event, for failures after streaming began."""
        return sse.frame(json.dumps(self.body())).encode()


def malformed_json(detail: str) -> APIError:
    return APIError(
        400, f"The request body is not valid JSON ({detail}). Send a JSON object.", code="invalid_json"
    )


def from_validation_error(exc: ValidationError) -> APIError:
    """First pydantic error -> a 400 naming the offending parameter."""
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return APIError(400, f"Invalid request: {where}{msg}{more}.", param=param, code="invalid_value")


def unknown_model(model: str, known: list[str]) -> APIError:
    hint = f" Available models: {', '.join(sorted(known))}." if known else " No models are registered yet."
    return APIError(
        404,
        f"The model '{model}' does not exist.{hint} See GET /v1/models.",
        param="model",
        code="model_not_found",
    )


def wrong_task(model: str, method: str) -> APIError:
    """A model asked for what its nodes do not serve (embeddings of a chat model, or the reverse)."""
    serves = "chat and completions, not embeddings" if method == "embeddings" else "embeddings only"
    return APIError(
        400,
        f"The model '{model}' serves {serves}. See GET /v1/models for each model's capabilities.",
        param="model",
        code="model_not_supported",
    )


def no_live_node(model: str) -> APIError:
    return APIError(
        503,
        f"No live node serves the model '{model}' right now; retry shortly.",
        type="service_unavailable",
        code="no_live_node",
    )


def upstream_failed(model: str) -> APIError:
    return APIError(
        503,
        f"Every node tried for '{model}' failed before answering; retry shortly.",
        type="service_unavailable",
        code="upstream_failed",
    )


def stream_interrupted() -> APIError:
    return APIError(
        502,
        "The serving node failed mid-stream; the response is incomplete.",
        type="server_error",
        code="stream_interrupted",
    )


def timed_out(seconds: float) -> APIError:
    return APIError(
        504,
        f"The request passed its time limit of {seconds:.0f} s (a base plus an allowance per requested "
        "token); ask for fewer tokens or retry.",
        type="server_error",
        code="timeout",
    )


def from_engine_error(message: str, status: int, type_: str | None) -> APIError:
    """An error vLLM reported (e.g. max_tokens beyond the context window)."""
    status = status if 400 <= status < 600 else 400
    kind = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return APIError(status, message, type=kind, code=None)


def from_node_error(error: NodeError) -> APIError:
    """A node's error answer; a code that is not a number is the node's own failure (500)."""
    code = error.code if isinstance(error.code, int) else 500
    return from_engine_error(error.message, code, error.type)


def not_found(path: str) -> APIError:
    return APIError(
        404,
        f"Unknown path {path}. Endpoints: /v1/models, /v1/chat/completions, /v1/completions, "
        "/health, /metrics.",
        code="not_found",
    )


def method_not_allowed(method: str, path: str) -> APIError:
    return APIError(405, f"{method} is not allowed on {path}.", code="method_not_allowed")


def unauthorized() -> APIError:
    return APIError(
        401,
        "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
        type="authentication_error",
        code="invalid_api_key",
    )

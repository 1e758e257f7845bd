"""What the HTTP fuzz tests send (issue 13): arbitrary JSON, and valid requests with fields replaced by
arbitrary values; and what every answer must be: below 500, OpenAI-shaped when an error. Shared by the
unit fuzz (the gateway's app over a fake node) and the network fuzz (the real gateway over HTTP)."""

from __future__ import annotations

from hypothesis import strategies as st

PARAMS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "echo",
    "return_token_ids",
    "best_of",
    "suffix",
    "min_tokens",
    "priority",
    "unknown_field",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
BASES = [
    ("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 2}),
    (
        "/v1/chat/completions",
        {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
]


def check(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}

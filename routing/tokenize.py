"""`POST /tokenize` and `POST /detokenize`, as vLLM serves them (its own protocol models), answered by
the gateway with the trusted tokenizer it meters with (routing/metering.py): the counts a client gets
are the ones it is billed by, no node is asked, and a node's tokenizer is never trusted for them.

Chat prompts render the model's chat template the way metering and the validators do. Bodies are read
with the gateway's intake limits; ids to detokenize must be ids of the tokenizer. Tokenizing runs in a
worker thread: a large prompt never stalls the replica's event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from routing import errors, intake
from routing.metering import TokenCounter, message_dict


def _counter(counters: dict[str, TokenCounter], model: str) -> TokenCounter:
    counter = counters.get(model)  # intake.validate has refused a request without a model
    if counter is None:
        raise errors.unknown_model(model, sorted(counters))
    return counter


def _ids(counter: TokenCounter, body: Any) -> list[int]:
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest

    tok = counter.tok
    if isinstance(body, TokenizeChatRequest):
        text = tok.apply_chat_template(
            [message_dict(m) for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tokenize=False,
        )
        return list(tok.encode(text, add_special_tokens=body.add_special_tokens))
    return list(tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))


async def tokenize(counters: dict[str, TokenCounter], payload: dict, limits: intake.IntakeLimits) -> dict:
    from vllm.entrypoints.serve.tokenize.protocol import (
        TokenizeChatRequest,
        TokenizeCompletionRequest,
        TokenizeResponse,
    )

    request_cls = TokenizeChatRequest if "messages" in payload else TokenizeCompletionRequest
    body = intake.validate(payload, request_cls, limits)
    if getattr(body, "chat_template", None) or getattr(body, "tools", None):
        raise errors.APIError(
            400,
            "this network tokenizes with each model's own chat template, without tools",
            code="unsupported",
        )
    counter = _counter(counters, body.model)
    try:
        ids = await asyncio.to_thread(_ids, counter, body)
    except Exception as exc:  # noqa: BLE001 - the tokenizer's refusal (e.g. a template error) is the client's
        raise errors.APIError(400, f"cannot tokenize this prompt: {type(exc).__name__}") from None
    strs = counter.tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
    answer = TokenizeResponse(
        count=len(ids), max_model_len=counter.max_model_len, tokens=ids, token_strs=strs
    )
    return answer.model_dump(exclude_none=True)


async def detokenize(counters: dict[str, TokenCounter], payload: dict, limits: intake.IntakeLimits) -> dict:
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, DetokenizeResponse

    body = intake.validate(payload, DetokenizeRequest, limits)
    counter = _counter(counters, body.model)
    if len(body.tokens) > counter.max_model_len:
        raise errors.APIError(
            400, f"at most {counter.max_model_len} tokens (the context length)", param="tokens"
        )
    bound = counter.tokens or counter.vocab_size
    if bound is not None and any(t >= bound for t in body.tokens):
        raise errors.APIError(400, f"token ids must be below {bound} (the tokenizer's size)", param="tokens")
    text = await asyncio.to_thread(counter.tok.decode, body.tokens)
    return DetokenizeResponse(prompt=text).model_dump()

"""Fake nodes and helpers for the gateway's unit tests (no Ray, no vLLM): shared by every test module that
drives `GatewayCore` over HTTP. The fixture `harness` (tests/unit/conftest.py) builds a gateway with two
of these nodes.

Fake nodes mimic a Serve handle to ray.serve.llm's LLMServer: `.options(stream=True).chat.remote(body, raw)`
returns an async generator of response objects (non-streaming) or lists of SSE strings (streaming).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct

from cluster import NodeStats
from cluster.registry import NodeRegistryCore, _refused

OP = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


class FakeStream:
    def __init__(self, items, fail_at=None, delay_s=0.0):
        self._items, self._i, self._fail_at, self._delay_s = list(items), 0, fail_at, delay_s

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._i == 0 and self._delay_s:
            import asyncio

            await asyncio.sleep(self._delay_s)  # a slow first byte (busy node)
        if self._fail_at is not None and self._i == self._fail_at:
            raise RuntimeError("node died")
        if self._i >= len(self._items):
            raise StopAsyncIteration
        self._i += 1
        return self._items[self._i - 1]

    def cancel(self):
        pass


class FakeNode:
    def __init__(self, node_id, fail_at=None):
        self.node_id, self.fail_at, self.calls = node_id, fail_at, 0
        self.delay_s = 0.0
        self.bodies = []

    def options(self, **_):
        return self

    def _respond(self, body, kind):
        """Like vLLM: token id lists when the request has return_token_ids, nulls otherwise."""
        self.calls += 1
        self.bodies.append(body.model_copy())
        from ray.serve.llm.openai_api_models import CompletionResponse

        with_ids = bool(body.return_token_ids)
        if not body.stream:
            resp = CompletionResponse(
                id=f"cmpl-{body.request_id}",
                model=body.model,
                created=0,
                choices=[
                    {
                        "index": 0,
                        "text": "hello world",
                        "finish_reason": "length",
                        "token_ids": [7, 8] if with_ids else None,
                    }
                ],
                usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            )
            return FakeStream([resp.model_dump_json()], self.fail_at, self.delay_s)
        chunks = [
            [
                f'data: {{"id":"c","choices":[{{"index":0,"text":"{t}","finish_reason":{fin},'
                f'"token_ids":{ids if with_ids else "null"}}}],"usage":null}}\n\n'
            ]
            for t, ids, fin in (("he", "[7]", "null"), ("llo", "[8]", '"length"'))
        ]
        if body.stream_options and body.stream_options.include_usage:
            chunks.append(
                [
                    'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
                    '"total_tokens":5}}\n\n'
                ]
            )
        chunks.append(["data: [DONE]\n\n"])
        return FakeStream(chunks, self.fail_at, self.delay_s)

    @property
    def completions(self):
        node = self

        class _M:
            def remote(self, body, raw):
                return node._respond(body, "completions")

        return _M()

    @property
    def embeddings(self):
        node = self

        class _M:
            def remote(self, body, raw):
                node.calls += 1
                node.bodies.append(body.model_copy())
                return FakeStream([node.embedding_answer(body)], node.fail_at, node.delay_s)

        return _M()

    def embedding_answer(self, body) -> str:
        """vLLM's answer shape: one unit vector per input (its first element says which input it is)."""
        from routing.intake import prompts

        n = len(prompts(body))
        vectors = [[float(i + 1), 0.0, 0.0, 0.0] for i in range(n)]
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(struct.pack("<4f", *v)).decode() for v in vectors]
        data = [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": 3 * n, "total_tokens": 3 * n, "completion_tokens": 0}
        return json.dumps(
            {"id": "embd-1", "object": "list", "model": body.model, "data": data, "usage": usage}
        )


class FakeShadowFeed:
    """The actor-handle shape of the shadow feed (`feed.offer.remote(items)`), keeping what it was offered."""

    def __init__(self):
        self.items = []
        feed = self

        class _Offer:
            @staticmethod
            def remote(items):
                feed.items.extend(items)

        self.offer = _Offer()


def actor_handle(obj):
    """The actor-handle shape of a plain object (a usage store without Ray): `handle.method.remote(*args)`
    starts `obj.method(*args)` at once, as Ray does, and returns something to await for its result."""

    class _Method:
        def __init__(self, fn) -> None:
            self.remote = lambda *args: asyncio.ensure_future(fn(*args))

    class _Handle:
        def __getattr__(self, name):
            return _Method(getattr(obj, name))

    return _Handle()


class FakeRegistry:
    """The registry actor's surface over a NodeRegistryCore (what `.remote` does, without Ray)."""

    def __init__(self, core: NodeRegistryCore) -> None:
        self.core = core
        for name in ("claim", "join", "leave", "policy"):
            setattr(self, name, self._remote(name))

    def _remote(self, name):
        async def call(*args):
            await asyncio.sleep(0)
            if name == "policy":
                return self.core.policy
            return _refused(getattr(self.core, name), *args)

        return type("M", (), {"remote": staticmethod(call)})


def node_stats(node_id, *, live: bool = True, model_id: str = "default", task: str = "generate"):
    return NodeStats(
        node_id=node_id,
        model_id=model_id,
        task=task,
        operator=OP,
        accelerator_type="H100",
        capacity=8,
        live=live,
        running_replicas=1 if live else 0,
        joined_at=0.0,
    )


class CharTokenizer:
    """One token per character (ids = code points); a chat template of <role>content per message."""

    def __len__(self):
        return 0x110000  # every code point

    def encode(self, text, add_special_tokens=False):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class LyingNode(FakeNode):
    """Answers 'hello' with honest ids (or `ids`), but reports `usage` of its own choosing."""

    def __init__(self, node_id, usage=(10**6, 999), ids=None, chunks=None):
        super().__init__(node_id)
        self.usage, self.ids, self.chunks = usage, ids, chunks

    def _respond(self, body, kind):
        self.calls += 1
        from ray.serve.llm.openai_api_models import CompletionResponse

        ids = self.ids if self.ids is not None else [ord(c) for c in "hello"]
        p, c = self.usage
        if self.chunks is not None:
            return FakeStream([[x] for x in self.chunks])
        if not body.stream:
            resp = CompletionResponse(
                id="x",
                model=body.model,
                created=0,
                choices=[{"index": 0, "text": "hello", "finish_reason": "stop", "token_ids": ids}],
                usage={"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            )
            return FakeStream([resp.model_dump_json()])
        return FakeStream(
            [
                [
                    f'data: {{"choices":[{{"index":0,"text":"hello","finish_reason":"stop","token_ids":{ids}}}]}}\n\n'
                ],
                [
                    f'data: {{"choices":[],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{p + c}}}}}\n\n'
                ],
                ["data: [DONE]\n\n"],
            ]
        )


class ErrorNode(LyingNode):
    """Answers with vLLM's ErrorResponse, as JSON text (what every node sends)."""

    def __init__(self, node_id, code):
        super().__init__(node_id)
        self.code = code

    def _respond(self, body, kind):
        self.calls += 1
        err = {
            "error": {
                "message": "engine says no",
                "type": "BadRequestError",
                "param": None,
                "code": self.code,
            }
        }
        return FakeStream([json.dumps(err)])

"""A lying node for the integration tests: a real Ray Serve deployment with the node interface the
gateway calls (`chat` / `completions` returning a stream of messages, like ray.serve.llm's LLMServer),
registered in the real registry. What it does is chosen by the prompt's first word:

    inflate  honest-looking text and ids, usage inflated a millionfold
    oov      token ids outside the vocabulary, text that does not match them
    garbage  one good chunk, then a chunk that is not JSON
    badtype  one good chunk, then a chunk whose text is a number and ids are negative
"""

from __future__ import annotations

import json

LIAR_ID = "liar-1"
LIAR_MODEL = "liar"
TEXT = "hello there"


def _chunk(text: str, ids: list[int], finish: str | None = None) -> str:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    return "data: " + json.dumps({"id": "x", "object": "text_completion", "choices": [choice]}) + "\n\n"


def liar_app(ids_of_text: list[int]):
    from ray import serve
    from ray.serve.llm.openai_api_models import CompletionResponse

    @serve.deployment(name=f"node-{LIAR_ID}", ray_actor_options={"num_cpus": 0})
    class Liar:
        async def completions(self, body, raw=None):
            mode = (body.prompt if isinstance(body.prompt, str) else "").split(" ")[0]
            ids = [10**9, 10**9 + 1] if mode == "oov" else ids_of_text
            huge = 10**6
            if not body.stream:
                yield CompletionResponse(  # as text, like every node (cluster/deployment.py)
                    id="x",
                    model=body.model,
                    created=0,
                    choices=[{"index": 0, "text": TEXT, "token_ids": ids, "finish_reason": "stop"}],
                    usage={"prompt_tokens": huge, "completion_tokens": huge, "total_tokens": 2 * huge},
                ).model_dump_json()
                return
            yield [_chunk(TEXT[:5], ids[:1])]
            if mode == "garbage":
                yield ["data: {this is not json\n\n"]
                return
            if mode == "badtype":
                yield ['data: {"choices":[{"index":0,"text":7,"token_ids":[-3]}]}\n\n']
                return
            yield [_chunk(TEXT[5:], ids[1:], "stop")]
            usage = {"prompt_tokens": huge, "completion_tokens": huge, "total_tokens": 2 * huge}
            yield ["data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"]
            yield ["data: [DONE]\n\n"]

        async def chat(self, body, raw=None):
            raise NotImplementedError("the liar only lies on /v1/completions")
            yield  # an async generator, like LLMServer's

    return Liar.bind()

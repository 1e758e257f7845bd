"""The vLLM-backed reference engine and tokenizer adapter used by validators (vLLM imported lazily).

A validator runs its own trusted engine of each claimed model. Verification is one teacher-forced
prefill per completion: prompt + completion as a single prompt, `max_tokens=1`, `prompt_logprobs=k`;
vLLM then returns, for every prompt position, the logprob of the actual token plus the top-k.
Prompt logprobs are computed from the raw logits (temperature 1), whatever the node's sampling params.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scoring.grammar import JsonGrammar


class HFCodec:
    """TextCodec over a Hugging Face tokenizer; EOS ids come from generation_config.json when present."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int] | None = None) -> None:
        self.tok = tokenizer
        ids = set(eos_token_ids or ())
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(ids)
        self.vocab_size = len(tokenizer)  # base vocabulary + added special tokens
        self._grammar: JsonGrammar | None = None
        self._grammar_lock = threading.Lock()
        self._tool_parsers: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> HFCodec:
        from transformers import AutoTokenizer

        eos: list[int] = []
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            eos = value if isinstance(value, list) else ([value] if value is not None else [])
        return cls(AutoTokenizer.from_pretrained(str(model_dir)), eos)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tok.decode(list(token_ids), skip_special_tokens=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids as the engine sees a plain completion prompt (special tokens added, e.g. BOS)."""
        return list(self.tok.encode(prompt, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of a chat request (template applied with the request's tools as vLLM passes them,
        generation prompt added)."""
        text = self.tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        return list(self.tok.encode(text, add_special_tokens=False))

    def tool_parser(self, name: str) -> Any:
        """vLLM's tool parser `name` over this tokenizer (built once; non-streaming parses keep no state)."""
        with self._grammar_lock:
            if name not in self._tool_parsers:
                from vllm.tool_parsers import ToolParserManager

                self._tool_parsers[name] = ToolParserManager.get_tool_parser(name)(self.tok)
            return self._tool_parsers[name]

    def grammar(self) -> JsonGrammar:
        """The structured-output grammar over this tokenizer (built once; verifications share it)."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = JsonGrammar(self.tok, self.vocab_size, sorted(self.eos_token_ids))
            return self._grammar


class VllmReferenceEngine:
    """ReferenceEngine on a local `vllm.LLM` (blocking; call it from a thread in async code).

    Pass an existing `llm` to share one engine (e.g. in tests, where the same engine also generates).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        llm: Any = None,
        max_model_len: int = 1024,
        max_logprobs: int = 20,
        **engine_kwargs: Any,
    ) -> None:
        if llm is None:
            if model is None:
                raise ValueError("VllmReferenceEngine needs a model path/id or an existing vllm.LLM")
            from vllm import LLM

            llm = LLM(
                model=str(model),
                max_model_len=max_model_len,
                max_logprobs=max_logprobs,
                seed=0,
                **engine_kwargs,
            )
        self.llm = llm
        self.max_model_len = int(llm.llm_engine.model_config.max_model_len)

    def prompt_logprobs(
        self, prompt_token_ids: Sequence[int], completion_token_ids: Sequence[int], top_k: int
    ) -> list[dict[int, float]]:
        return self.prompt_logprobs_many([(prompt_token_ids, completion_token_ids)], top_k)[0]

    def prompt_logprobs_many(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], top_k: int
    ) -> list[list[dict[int, float]]]:
        """Batched teacher forcing: one engine call for many (prompt ids, completion ids) pairs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        prompts = [TokensPrompt(prompt_token_ids=[*p, *c]) for p, c in pairs]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for (p, c), out in zip(pairs, outs):
            plp = out.prompt_logprobs
            result.append(
                [{int(t): float(lp.logprob) for t, lp in plp[len(p) + i].items()} for i in range(len(c))]
            )
        return result

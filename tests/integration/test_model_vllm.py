"""The built default model loads in real vLLM (CPU) and generates, for completions and for chats."""

from __future__ import annotations

import os

import pytest

from cluster.model import build_default_model

pytestmark = pytest.mark.integration

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory must never trigger a hub lookup


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from vllm import LLM

    path = build_default_model(seed=0, cache_dir=tmp_path_factory.mktemp("models"))
    engine = LLM(model=str(path), max_model_len=1024, dtype="float32", enforce_eager=True, seed=0)
    yield engine
    del engine


def greedy(max_tokens: int = 24):
    from vllm import SamplingParams

    # ignore_eos: a random model may emit <|end|> early; we want a fixed-length, comparable output.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_completion_generates_deterministically(llm):
    first = llm.generate(["The river bent twice"], greedy())[0]
    second = llm.generate(["The river bent twice"], greedy())[0]
    assert len(first.outputs[0].token_ids) == 24
    assert first.prompt_token_ids[0] == llm.get_tokenizer().bos_token_id  # completions start with <|bos|>
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert first.outputs[0].text == second.outputs[0].text


def test_chat_uses_the_template_and_generates_deterministically(llm):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What time does the shop open?"},
    ]
    first = llm.chat(messages, greedy())[0]
    second = llm.chat(messages, greedy())[0]
    tok = llm.get_tokenizer()
    prompt = tok.decode(first.prompt_token_ids)
    assert prompt.startswith("<|bos|><|system|>\nYou answer briefly.<|end|>\n<|user|>\n")
    assert prompt.endswith("<|assistant|>\n")
    assert prompt.count("<|bos|>") == 1  # the template adds it; vLLM must not add a second one
    assert len(first.outputs[0].token_ids) > 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids


def test_generation_stops_at_end_of_turn(llm):
    """generation_config's eos list includes <|end|>, so a chat reply can end cleanly."""
    from vllm import SamplingParams

    end_id = llm.get_tokenizer().convert_tokens_to_ids("<|end|>")
    params = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={end_id: 100.0})
    out = llm.generate(["Hello"], params)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert len(out.token_ids) == 1


def test_vllm_agrees_with_transformers_and_is_peaked(llm):
    """vLLM runs the same network transformers does (names, shapes, RoPE, norms), and its outputs are peaked."""
    import math

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from vllm import SamplingParams

    prompt = "Once upon a time there was a clock"
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    out = llm.generate([prompt], params)[0]
    path = llm.llm_engine.model_config.model
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert out.prompt_token_ids == hf_tok(prompt).input_ids
    model = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        hf = model.generate(
            torch.tensor([out.prompt_token_ids]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=hf_tok.pad_token_id,
        )
    assert list(out.outputs[0].token_ids) == hf[0, len(out.prompt_token_ids) :].tolist()
    top1 = [
        math.exp(step[tid].logprob)
        for tid, step in zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)
    ]
    assert sorted(top1)[len(top1) // 2] > 0.3, top1  # median top-1 probability; uniform would be 1/2048

"""The default model builder: determinism, caching, concurrency, the tokenizer and chat template, peakedness."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.model import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_ID,
    REQUIRED_FILES,
    ModelRecipe,
    build_default_model,
    ensure_default_models,
    model_dir_for,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    return ensure_default_models((0, 1), cache_dir=tmp_path_factory.mktemp("models"))


def test_directory_has_every_file_vllm_needs(models):
    path = models[0]
    assert DEFAULT_MODEL_ID == "default"
    for name in REQUIRED_FILES:
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] >= 32
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((path / "generation_config.json").read_text())
    assert config["eos_token_id"] in gen["eos_token_id"]


def test_same_seed_gives_byte_identical_files(models, tmp_path):
    import torch

    torch.manual_seed(12345)  # the caller's global RNG must not leak into the weights
    rng_before = torch.get_rng_state()
    again = build_default_model(seed=0, cache_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_before)  # ...nor be consumed by the build
    assert again != models[0]
    for name in REQUIRED_FILES:
        assert sha256(again / name) == sha256(models[0] / name), name


def test_another_seed_gives_other_weights_and_the_same_tokenizer(models):
    assert models[0] != models[1]
    assert sha256(models[0] / "model.safetensors") != sha256(models[1] / "model.safetensors")
    assert sha256(models[0] / "tokenizer.json") == sha256(models[1] / "tokenizer.json")


def test_weights_match_the_config_shapes(models):
    from safetensors import safe_open

    config = json.loads((models[0] / "config.json").read_text())
    with safe_open(str(models[0] / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [
            config["vocab_size"],
            config["hidden_size"],
        ]
        kv = config["num_key_value_heads"] * config["head_dim"]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [
            kv,
            config["hidden_size"],
        ]
    assert "lm_head.weight" in names
    assert sum(n.startswith("model.layers.") for n in names) == 9 * config["num_hidden_layers"]


def test_cached_model_is_reused_without_rebuilding(tmp_path):
    steps: list[str] = []
    first = build_default_model(seed=3, cache_dir=tmp_path, progress=steps.append)
    built_steps = len(steps)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = build_default_model(seed=3, cache_dir=tmp_path, progress=steps.append)
    assert second == first
    assert len(steps) == built_steps  # no progress reported: nothing was built
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime


def test_concurrent_builders_build_once_and_leave_no_temp_dirs(tmp_path):
    steps: list[str] = []
    with ThreadPoolExecutor(max_workers=4) as pool:  # exceptions in a builder re-raise here
        results = list(pool.map(lambda _: build_default_model(2, tmp_path, steps.append), range(4)))
    assert len(set(results)) == 1
    assert sum(s.startswith("training") for s in steps) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir() and p != results[0]]
    assert leftovers == []


def test_incomplete_cache_dir_is_reported_not_reused(tmp_path):
    target = model_dir_for(ModelRecipe(seed=4), tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"incomplete.*Delete it"):
        build_default_model(seed=4, cache_dir=tmp_path)


def test_env_var_sets_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MERITNET_CACHE_DIR", str(tmp_path / "cache"))
    path = model_dir_for(ModelRecipe(seed=7))
    assert path.parent == tmp_path / "cache"
    assert path.name.startswith("meritnet-tiny-llama-seed7-")


def test_recipe_hash_changes_with_the_recipe(tmp_path):
    base = model_dir_for(ModelRecipe(), tmp_path)
    assert model_dir_for(ModelRecipe(lm_head_std=0.3), tmp_path) != base
    assert model_dir_for(ModelRecipe(), tmp_path) == base


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"head_dim": 16}, "head_dim"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"dtype": "float16"}, "dtype"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_recipes_are_rejected_with_the_field_named(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelRecipe(**fields)


def test_conflicting_seeds_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="conflicts"):
        build_default_model(seed=1, cache_dir=tmp_path, recipe=ModelRecipe(seed=2))


def test_tokenizer_round_trips_and_prefixes_bos(models):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(models[0] / "tokenizer.json"))
    text = "The clockmaker's café opened at 7:30, naïvely. 日本語 🙂"
    enc = tok.encode(text)
    assert enc.tokens[0] == "<|bos|>"
    assert tok.decode(enc.ids, skip_special_tokens=True) == text  # byte-level: any UTF-8 survives
    assert tok.get_vocab_size() == 2048  # the shipped corpus is large enough to fill the vocabulary
    for special in ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        assert tok.encode(special, add_special_tokens=False).tokens == [special]  # one atomic token


def test_chat_template_renders_turns_and_rejects_unknown_roles():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    template = ImmutableSandboxedEnvironment().from_string(CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = template.render(
        messages=messages, bos_token="<|bos|>", add_generation_prompt=True, raise_exception=raise_exception
    )
    assert out == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    no_prompt = template.render(
        messages=messages, bos_token="<|bos|>", add_generation_prompt=False, raise_exception=raise_exception
    )
    assert not no_prompt.endswith("<|assistant|>\n")
    with pytest.raises(ValueError, match="roles"):
        template.render(
            messages=[{"role": "developer", "content": "x"}], bos_token="", raise_exception=raise_exception
        )
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
    loop = [
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    out = template.render(
        messages=loop, bos_token="", add_generation_prompt=False, raise_exception=raise_exception
    )
    assert out == (
        '<|assistant|>\n[get_weather(city="Paris", days=2), get_weather(city="Paris", days=2)]<|end|>\n'
        "<|user|>\ntool result: sunny<|end|>\n"
    )


PROMPTS = [
    "The river bent twice",
    "Once upon a time there was a clock",
    "Hello, how are you today?",
    "1 2 3 4 5 6",
    "<|user|>\nWhat time is it?<|end|>\n<|assistant|>\n",
]
SAME_LAST_TOKEN = "A bridge bent twice"  # ends like PROMPTS[0], with another history


def next_token_probs(path: Path, prompts: list[str]):
    """Next-token distributions at every position of each prompt, through transformers (the reference Llama)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(tok(p, return_tensors="pt").input_ids).logits[0].softmax(-1) for p in prompts]


def test_next_token_distributions_are_peaked_and_seed_specific(models):
    """Why the init is scaled: verification needs peaked outputs that differ between models."""
    import torch

    *p0, other_history = next_token_probs(models[0], [*PROMPTS, SAME_LAST_TOKEN])
    p1 = next_token_probs(models[1], PROMPTS)
    top1 = torch.cat([p.max(-1).values for p in p0])
    entropy = torch.cat([-(p * p.clamp_min(1e-30).log()).sum(-1) for p in p0])
    assert top1.median() > 0.5, top1  # std-0.02 init gives ~1/2048
    assert entropy.mean() < 2.0, entropy  # nats; uniform over 2048 tokens would be 7.6
    total_variation = torch.cat([0.5 * (a - b).abs().sum(-1) for a, b in zip(p0, p1, strict=True)])
    assert total_variation.min() > 0.9, total_variation  # two seeds: nearly disjoint predictions
    # The context matters, not only the last token.
    assert 0.5 * (p0[0][-1] - other_history[-1]).abs().sum() > 0.1


def test_losing_the_rename_race_reuses_the_winner(tmp_path, monkeypatch):
    """Without an effective lock (e.g. some network filesystems) a second builder's rename fails: reuse."""
    import shutil

    import cluster.model as builder

    elsewhere = build_default_model(seed=5, cache_dir=tmp_path / "elsewhere")
    real_rename = builder.os.rename
    calls: list[str] = []

    def rename(src, dst):  # another builder finishes just before our rename
        calls.append("rename")
        shutil.copytree(elsewhere, dst)
        real_rename(src, dst)  # raises: dst exists and is not empty

    monkeypatch.setattr(builder.os, "rename", rename)
    path = build_default_model(seed=5, cache_dir=tmp_path / "cache")
    assert calls == ["rename"]
    assert sha256(path / "model.safetensors") == sha256(elsewhere / "model.safetensors")
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [path]  # our temp dir is gone

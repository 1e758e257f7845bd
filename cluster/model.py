"""Build meritnet's default model locally: hub downloads are impossible on offline machines.

The result is an ordinary Hugging Face model directory (Llama architecture, random weights from a
fixed seed, a byte-level BPE tokenizer trained on the corpus shipped in `cluster/corpus/`, a chat
template) that vLLM and ray.serve.llm load like any downloaded checkpoint.

Determinism: the same recipe (seed included) gives byte-identical `model.safetensors` and
`tokenizer.json`. Weights come from a private `torch.Generator`, so the caller's global RNG state
neither affects nor is affected by a build; a different seed gives a "different model".

Peaked distributions (why the init is not the usual std 0.02): with tiny weights a random model's
next-token distribution is close to uniform over the vocabulary, so "did this node serve the claimed
model?" cannot be told from its outputs. We instead initialise every projection at unit gain
(std = 1/sqrt(fan_in)) so each layer changes the residual stream as much as the token embedding does
(the output depends on the context, not only the last token), and the lm_head with std
`lm_head_std`, which makes the logits' spread ~ sqrt(hidden) * lm_head_std (~7 nats at the defaults).
Typical top-1 probabilities are then 0.5-0.9 and two seeds' next-token distributions barely overlap
(see tests/unit/test_model_builder.py for the measured bounds).

Caching: `<root>/<name>-seed<seed>-<recipe hash>/`, where root is `cache_dir`, else
$MERITNET_CACHE_DIR, else ~/.cache/meritnet/models. A build happens once: under an exclusive file
lock, into a temporary directory beside the target, then renamed into place, so a reader sees either
no directory or a complete one, and concurrent builders (threads or processes) never corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL_ID = "default"

# Bump when the build procedure changes in a way the recipe fields do not capture: it is part of the
# recipe hash, so old cache entries are simply not reused.
BUILD_FORMAT_VERSION = 2  # 2: the chat template takes tool calls and tool results

CORPUS_DIR = Path(__file__).parent / "corpus"
CACHE_ENV = "MERITNET_CACHE_DIR"

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Special tokens take the first ids, in this order, so their ids are stable across corpora.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS, END_OF_TURN)

# One turn: "<|role|>\ncontent<|end|>\n". The prompt starts with <|bos|> (the template adds it, and
# chat front-ends tokenize templated prompts without adding special tokens again). Tools: an assistant
# turn's tool calls follow its content in the pythonic form its tool parser reads back
# ("[get_weather(city=\"Paris\")]", arguments as the dict vLLM makes of them), and a tool's result is a
# user turn that says so ("tool result: ..."), so an agent loop can send results back.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Only system, user, assistant and tool roles are supported, got ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|user|>\\ntool result: ' + (message.get('content') or '') + '<|end|>\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message.get('content') or '') }}"
    "{% if message.get('tool_calls') %}{{ '[' }}"
    "{% for call in message['tool_calls'] %}{{ call['function']['name'] + '(' }}"
    "{% for key, value in call['function']['arguments'].items() %}{{ key + '=' }}{{ value | tojson }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}"
    "{{ ')' }}{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{{ ']' }}"
    "{% endif %}"
    "{{ '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

Progress = Callable[[str], None]


class ModelRecipe(BaseModel):
    """Everything that determines the built model's bytes (with the corpus and BUILD_FORMAT_VERSION)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        default="meritnet-tiny-llama",
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="Model family name; the first part of the cache directory's name.",
    )
    seed: int = Field(
        default=0, ge=0, lt=2**63, description="Seed of the weight init; another seed, another model."
    )
    vocab_size: int = Field(
        default=2048,
        ge=512,
        le=65536,
        description="Tokenizer vocabulary size (bytes + merges + special tokens).",
    )
    hidden_size: int = Field(default=256, ge=32, description="Width of the residual stream.")
    num_hidden_layers: int = Field(default=4, ge=1, le=64, description="Number of decoder layers.")
    num_attention_heads: int = Field(default=4, ge=1, description="Query heads per layer.")
    num_key_value_heads: int = Field(
        default=2, ge=1, description="Key/value heads per layer (grouped-query attention)."
    )
    head_dim: int = Field(
        default=64, ge=32, description="Width of one attention head; vLLM's CPU attention rejects < 32."
    )
    intermediate_size: int = Field(default=512, ge=1, description="Width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(
        default=2048, ge=64, description="Longest context the model supports."
    )
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base frequency.")
    rms_norm_eps: float = Field(default=1e-5, gt=0, description="Epsilon of the RMSNorm layers.")
    embedding_std: float = Field(
        default=1.0, gt=0, description="Std of the token embeddings (unit-scale residual)."
    )
    lm_head_std: float = Field(
        default=0.45,
        gt=0,
        description="Std of the output projection; sets the logits' spread (~ sqrt(hidden) * this) and so "
        "how peaked next-token distributions are. 0.02 would give near-uniform outputs.",
    )
    dtype: str = Field(
        default="float32", pattern=r"^(float32|bfloat16)$", description="Dtype the weights are stored in."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelRecipe:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must hold the 256 byte tokens and {len(SPECIAL_TOKENS)} special tokens"
            )
        return self


def corpus_files() -> list[Path]:
    """The shipped corpus, in a fixed order (sorted names) so training is reproducible."""
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(
            f"No corpus files (*.txt) in {CORPUS_DIR}; the package install is incomplete."
        )
    return files


def recipe_hash(recipe: ModelRecipe) -> str:
    """Short digest of everything that determines the model's bytes: recipe, corpus and build format."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": BUILD_FORMAT_VERSION, **recipe.model_dump()}, sort_keys=True).encode())
    for path in corpus_files():
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:12]


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meritnet" / "models"


def model_dir_for(recipe: ModelRecipe, cache_dir: Path | None = None) -> Path:
    """Where `recipe` is (or will be) built; does not build."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"{recipe.name}-seed{recipe.seed}-{recipe_hash(recipe)}"


def build_default_model(
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    recipe: ModelRecipe | None = None,
) -> Path:
    """Return the directory of the default model for `seed`, building it on first use.

    `recipe` overrides the architecture (its seed must then equal `seed` or be left at the default).
    Safe to call from several processes at once: one builds, the others wait and reuse.
    """
    recipe = _resolve_recipe(seed, recipe)
    say = progress or (lambda _msg: None)
    target = model_dir_for(recipe, cache_dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if _is_complete(target):  # another builder finished while we waited for the lock
            return target
        if target.exists():
            raise RuntimeError(
                f"Model cache directory {target} exists but is incomplete (missing one of {REQUIRED_FILES}). "
                "Delete it and run again to rebuild."
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users' engines
            write_model(recipe, tmp, say)
            try:
                os.rename(tmp, target)  # atomic on one filesystem: readers never see a partial model
            except OSError:
                # Where flock is advisory-only (some network filesystems) another builder may have won
                # the rename; its result is byte-identical, so use it and drop ours.
                if not _is_complete(target):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    say(f"model ready at {target}")
    return target


def ensure_default_models(
    seeds: tuple[int, ...] = (0, 1), cache_dir: Path | None = None, progress: Progress | None = None
) -> dict[int, Path]:
    """Build (or reuse) the default model for each seed; seed -> model directory."""
    return {seed: build_default_model(seed=seed, cache_dir=cache_dir, progress=progress) for seed in seeds}


def write_model(recipe: ModelRecipe, out: Path, progress: Progress | None = None) -> None:
    """Write the complete model directory for `recipe` into the existing directory `out` (no caching)."""
    say = progress or (lambda _msg: None)
    say("training the tokenizer")
    tokenizer = train_tokenizer(recipe.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    special_ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    _write_json(out / "tokenizer_config.json", _tokenizer_config(recipe))
    _write_json(out / "config.json", _model_config(recipe, special_ids))
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": special_ids[BOS],
            # End of a chat turn stops generation too, so chat replies end cleanly.
            "eos_token_id": [special_ids[EOS], special_ids[END_OF_TURN]],
            "pad_token_id": special_ids[PAD],
        },
    )
    say(f"initialising weights (seed {recipe.seed})")
    tensors = init_weights(recipe)
    say("writing model.safetensors")
    from safetensors.torch import save_file

    # Fixed metadata (no timestamps, no versions) so the file's bytes depend on the recipe alone.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the shipped corpus; deterministic for a given corpus and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in corpus_files()], trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain prompts (completions) start with <|bos|>; pairs are not used but must be defined.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def init_weights(recipe: ModelRecipe) -> dict:
    """name -> tensor for every LlamaForCausalLM parameter, from a private generator seeded by the recipe.

    Tensors are generated in sorted-name order so the bytes never depend on dict ordering elsewhere.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[recipe.dtype]
    out = {}
    for name, shape in sorted(_parameter_shapes(recipe).items()):
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * _init_std(name, shape, recipe)
        out[name] = t.to(dtype).contiguous()
    return out


def _init_std(name: str, shape: tuple[int, ...], recipe: ModelRecipe) -> float:
    if name == "model.embed_tokens.weight":
        return recipe.embedding_std
    if name == "lm_head.weight":
        return recipe.lm_head_std
    return 1.0 / math.sqrt(shape[1])  # unit gain: each layer moves the residual as much as the embedding


def _parameter_shapes(recipe: ModelRecipe) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes transformers' LlamaForCausalLM uses (untied embeddings)."""
    h, v, i = recipe.hidden_size, recipe.vocab_size, recipe.intermediate_size
    q, kv = recipe.num_attention_heads * recipe.head_dim, recipe.num_key_value_heads * recipe.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(recipe.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes


def _model_config(recipe: ModelRecipe, special_ids: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": recipe.vocab_size,
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "head_dim": recipe.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": recipe.max_position_embeddings,
        "rms_norm_eps": recipe.rms_norm_eps,
        "rope_theta": recipe.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": recipe.dtype,
        "bos_token_id": special_ids[BOS],
        "eos_token_id": special_ids[EOS],
        "pad_token_id": special_ids[PAD],
    }


def _tokenizer_config(recipe: ModelRecipe) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [*ROLE_TOKENS, END_OF_TURN],
        "model_max_length": recipe.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _resolve_recipe(seed: int, recipe: ModelRecipe | None) -> ModelRecipe:
    if recipe is None:
        return ModelRecipe(seed=seed)
    if seed not in (0, recipe.seed):
        raise ValueError(f"seed={seed} conflicts with recipe.seed={recipe.seed}; set the seed in one place.")
    return recipe


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Process-exclusive flock (released by the kernel if the holder dies, so no stale locks)."""
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

"""Round-to-nearest quantized copies of a model (the quantization attack of issue 15)."""

from __future__ import annotations

import pytest
import torch

from cluster.model import ModelRecipe, build_default_model
from cluster.quantize import quantize_rtn, quantized_model


def test_int8_per_channel_error_is_within_half_a_step():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(w, 8)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q - w).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(q, w)


def test_int4_groups_hold_at_most_sixteen_levels():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_rtn(w, 4, group_size=32)
    for row in q.reshape(8, 2, 32).reshape(-1, 32):
        assert len(torch.unique(row)) <= 16
    rel = ((q - w).norm() / w.norm()).item()
    assert 0.02 < rel < 0.2, rel  # int4 RTN of Gaussian weights: ~10% relative error
    with pytest.raises(ValueError):
        quantize_rtn(w, 4, group_size=48)


def test_quantized_model_dir_changes_only_the_decoder_projections(tmp_path):
    from safetensors.torch import load_file

    recipe = ModelRecipe(hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=32)
    src = build_default_model(seed=0, cache_dir=tmp_path, recipe=recipe)
    out = quantized_model(src, "int4")
    assert (
        out.name.endswith("-int4-g32")
        and (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    )
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(("_proj" in k) for k in changed), changed
    assert torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert quantized_model(src, "int4") == out  # cached
    with pytest.raises(ValueError):
        quantized_model(src, "int3")  # type: ignore[arg-type]

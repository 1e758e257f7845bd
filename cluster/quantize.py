"""Quantized copies of a model: the cheat that pays (serve a cheaper model, claim the real one).

Round-to-nearest (RTN) symmetric weight quantization of every linear projection in the decoder layers
(q/k/v/o, gate/up/down), as weight-only int8 / int4 serving does; embeddings, norms and the lm_head stay
in full precision (as GPTQ/AWQ checkpoints leave them). The quantized weights are written back
dequantized (float32), so any engine serves them as an ordinary checkpoint with the numerics of a
weight-only quantized kernel (up to the kernel's activation rounding):

    int8: per output channel, scale = max|w_row| / 127
    int4: per group of `group_size` input columns (default 32), scale = max|w_group| / 7

The directory sits beside the source (`<source>-int4-g32/`), is built once under a file lock into a
temporary directory and renamed into place (readers see no directory or a complete one).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from cluster.model import _exclusive_lock, _is_complete

Scheme = Literal["int8", "int4"]
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
SCHEMES: dict[str, tuple[int, int | None]] = {"int8": (8, None), "int4": (4, 32)}  # bits, group size


def quantize_rtn(w, bits: int, group_size: int | None = None):
    """Dequantized symmetric RTN of a 2-D weight [out, in]: per output row, or per `group_size` columns."""
    import torch

    if w.dim() != 2:
        raise ValueError(f"quantize_rtn takes a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = group_size or in_f
    if in_f % g:
        raise ValueError(f"input width {in_f} is not a multiple of the group size {g}")
    qmax = 2 ** (bits - 1) - 1
    x = w.float().reshape(out_f, in_f // g, g)
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(x / scale).clamp(-qmax - 1, qmax)
    return (q * scale).reshape(out_f, in_f).to(w.dtype)


def quantized_model(src: str | Path, scheme: Scheme, group_size: int | None = None) -> Path:
    """The model dir `src` with its decoder projections RTN-quantized (built once, cached beside it)."""
    from safetensors.torch import load_file, save_file

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    bits, default_group = SCHEMES[scheme]
    group = group_size if group_size is not None else default_group
    src = Path(src)
    target = src.with_name(f"{src.name}-{scheme}" + (f"-g{group}" if group else ""))
    if _is_complete(target):
        return target
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if _is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            tensors = load_file(str(src / "model.safetensors"))
            out = {
                k: (quantize_rtn(t, bits, group) if _LINEAR.match(k) else t).contiguous()
                for k, t in sorted(tensors.items())
            }
            save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if target.exists():
                shutil.rmtree(target)  # an incomplete leftover of a crashed build
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target

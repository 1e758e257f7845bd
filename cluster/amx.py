"""Let vLLM's AMX kernels run: ask Linux for the AMX tile state in every vLLM engine process.

Why (issue 25): on Intel Xeons with AMX (Sapphire Rapids and later), Linux lets a process execute tile
instructions only after it asked for them (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`); without that
the first tile instruction raises SIGILL and the process dies with no Python traceback. vLLM CPU's
bfloat16 attention on such CPUs is an AMX kernel (`cpu_attn` picks "amx" when the block size is a
multiple of 32), but vLLM never asks: only the oneDNN inside its kernel library does, and only when it
builds a batched matmul (linear layers of more than 4 tokens). With `enforce_eager` there is no warm-up
run, so the first request with a prompt of 4 tokens or fewer (the gateway's "before": a completion of 2
tokens) reached the attention kernel first and killed the engine core, on every node at once.

`request_amx` is a vLLM general plugin (pyproject.toml, entry point group `vllm.general_plugins`): vLLM
runs it in the engine-core process and in every worker, before the model runs, in 'uni' and 'mp' alike,
and in validators' reference engines too. On CPUs without AMX it does nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def request_amx() -> bool:
    """Ask for AMX tile permission when this CPU has AMX; True when granted or not needed."""
    import torch

    if not torch.cpu._is_amx_tile_supported():
        return True
    if torch.cpu._init_amx():
        log.info("meritnet: AMX tile state granted to this vLLM process (pid-wide)")
        return True
    log.warning(
        "meritnet: this CPU has AMX but Linux refused the tile state to this process: vLLM's AMX kernels "
        "will crash it (SIGILL). Run the node with engine_kwargs {block_size: 16} (attention without AMX) "
        "or on a kernel that grants ARCH_REQ_XCOMP_PERM (Linux 5.16+)."
    )
    return False

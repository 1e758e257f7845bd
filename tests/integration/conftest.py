"""Shared helpers of the integration tests (real Ray, real vLLM, real EVMs)."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

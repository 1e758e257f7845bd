"""Setup shared by the integration tests (real Ray, real vLLM, real EVMs); their helpers are in
tests/support/ (ports, meritnet_up, metrics, package_network)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

"""What machine a figure was measured on: CPU model and the instruction sets vLLM's CPU kernels pick by."""

from __future__ import annotations

import os
import platform

# The flags that decide which kernel library vLLM CPU loads (AVX2, AVX-512, AVX-512 BF16 + AMX).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def machine() -> dict:
    """CPU model, the ISA flags above that this CPU has, logical cores, and the platform."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform string below still says what it was
        pass
    return {
        "cpu": model,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }

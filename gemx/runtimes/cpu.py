"""Which CPU is this, and which of the instructions the runtimes' fast kernels use does it have? Asked of the kernel
(/proc/cpuinfo), so no package is needed; every figure gemx reports and every CPU build record names them."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# The instructions that decide which precision is fast: AVX-512 (FP32), VNNI (int8 dot products), BF16 dot products,
# FP16 arithmetic, and AMX's int8/bf16 tile multiplies.
ISA = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")
BF16_ISA = ("avx512_bf16", "amx_bf16")  # native bf16 products: without either, bf16 is emulated and slower than fp32


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """The decisive ISA flags this CPU reports, in the order of `ISA`."""
    return [f for f in ISA if f in _cpuinfo()[1]]


def bf16_native() -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 natively, and if not, why bf16 is refused)."""
    if any(f in cpu_flags() for f in BF16_ISA):
        return True, ""
    return False, (f"this CPU ({cpu_model()}) has no bf16 instructions ({' or '.join(BF16_ISA)}), so bf16 would be emulated "
                   "and slower than fp32; use fp32 or int8")

"""Is there an NVIDIA GPU, and which? Asked of the CUDA driver directly, so no CUDA package is needed."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str


@cache
def detect_gpu() -> tuple[GpuInfo | None, str]:
    """(the first CUDA device, or None with the reason there is none)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "no NVIDIA driver on this machine (libcuda.so.1 not found)"
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None, "the NVIDIA driver reports no usable CUDA device"
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, 0)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, 0)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # ..._MINOR
    return GpuInfo(name.value.decode(), f"{major.value}.{minor.value}"), ""


def tensorrt_version() -> tuple[str | None, str]:
    try:
        import tensorrt
    except ImportError:
        return None, "TensorRT is not installed"
    return tensorrt.__version__, ""

"""What the figures were measured on: CPU, threads, GPU and library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict:
    import onnxruntime
    import torch

    import gemx
    from gemx.runtimes.gpu import detect_gpu, tensorrt_version

    gpu, gpu_why = detect_gpu()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "gpu": None if gpu is None else {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "gpu_note": gpu_why or None,
        "versions": {"gemx": gemx.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "tensorrt": tensorrt_version()[0], "python": platform.python_version()},
    }

"""What the figures were measured on: CPU, threads, GPU and library versions."""

from __future__ import annotations

import os
import platform

from gemx.runtimes.cpu import cpu_flags, cpu_model


def machine_info(threads: int | None = None) -> dict:
    import onnxruntime
    import torch

    import gemx
    from gemx.runtimes.gpu import detect_gpu, tensorrt_version

    gpu, gpu_why = detect_gpu()
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "gpu": None if gpu is None else {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "gpu_note": gpu_why or None,
        "versions": {"gemx": gemx.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "tensorrt": tensorrt_version()[0], "python": platform.python_version()},
    }

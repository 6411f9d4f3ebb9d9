"""What the figures were measured on: CPU, threads, GPU and library versions."""

from __future__ import annotations

import os
import platform

from gemx.runtimes.cpu import cpu_flags, cpu_model

GEMM_SIDE = 1024  # square GEMMs this large run at the kernels' peak on a CPU, and take milliseconds
GEMM_SECONDS = 0.1  # each precision's GEMM is repeated for this long (at least 5 times), and the best run kept


def gemm_peaks(threads: int | None = None) -> dict[str, float]:
    """What this CPU's best kernels reach, in GMAC/s: a large square GEMM per precision in oneDNN (PyTorch's CPU
    matmul), the best of GEMM_SECONDS of runs, with the profile's threads. The roof each row's achieved rate is read
    against."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    n = GEMM_SIDE
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g)
    runs = {"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16, "int8": lambda: torch._int_mm(a8, b8)}
    a16, b16 = a.bfloat16(), b.bfloat16()
    a8, b8 = (a * 100).to(torch.int8), (b * 100).to(torch.int8)
    peaks = {}
    for precision, run in runs.items():
        try:
            run()
        except RuntimeError:  # no int8 GEMM in this build of PyTorch
            continue
        times, start = [], time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < GEMM_SECONDS:
            times.append(_seconds(run, time))
        best = min(times)
        peaks[precision] = n**3 / best / 1e9
    return peaks


def _seconds(run, time) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def machine_info(threads: int | None = None) -> dict:
    import onnxruntime
    import torch

    import gemx
    from gemx.runtimes.gpu import detect_gpu, tensorrt_version
    from gemx.runtimes.openvino_session import openvino_version

    gpu, gpu_why = detect_gpu()
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "gpu": None if gpu is None else {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "gpu_note": gpu_why or None,
        "gemm_peak_gmacs": gemm_peaks(threads) if gpu is None else {},
        "versions": {"gemx": gemx.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "tensorrt": tensorrt_version()[0], "openvino": openvino_version()[0], "python": platform.python_version()},
    }

"""Where a frame's time goes, by operator type: ONNX Runtime's own profiler over the per-frame graph.

ORT writes one JSON trace per session; each kernel run is an event with its op type and duration.
Summed over timed runs and divided by their count, that is kernel time per frame by op type, the
breakdown that tells layout work (Transpose, ORT's Reorder nodes) from compute (Conv, MatMul).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LAYOUT_OPS = ("Transpose", "ReorderInput", "ReorderOutput")


@dataclass
class OpBreakdown:
    ms_per_frame: dict[str, float]  # op type -> kernel ms per frame, largest first
    nodes: dict[str, int]  # op type -> nodes that ran

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_frame.values())

    @property
    def layout_share(self) -> float:
        """Share of kernel time spent moving data between layouts (Transpose and ORT's Reorders)."""
        return sum(self.ms_per_frame.get(op, 0.0) for op in LAYOUT_OPS) / max(self.total_ms, 1e-12)


def frame_op_breakdown(graph: Path | bytes, feeds: dict[str, np.ndarray], runs: int = 10, warmup: int = 2,
                       threads: int | None = None) -> OpBreakdown:
    """Kernel time per frame by op type of the frame graph at `graph`, fed `feeds`, over `runs` timed calls."""
    import onnxruntime as ort

    from gemx.runtimes.ort_session import ort_source

    with tempfile.TemporaryDirectory(prefix="gemx-ops-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "frame")
        session = ort.InferenceSession(ort_source(graph), opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    # Only kernels inside the timed runs: the warm-up runs carry one-time work (allocation, packing).
    starts = sorted(e["ts"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_timed = starts[warmup] if len(starts) > warmup else 0
    ms: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first_timed:
            continue
        op = e.get("args", {}).get("op_name", "?")
        ms[op] = ms.get(op, 0.0) + e["dur"] / 1e3 / runs
        nodes.setdefault(op, set()).add(e["name"])
    ordered = dict(sorted(ms.items(), key=lambda kv: -kv[1]))
    return OpBreakdown(ordered, {op: len(n) for op, n in nodes.items()})

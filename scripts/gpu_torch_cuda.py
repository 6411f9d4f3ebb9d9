"""The torch-cuda runtime on a real GPU: per-frame latency (eager vs CUDA-graph replay, FP32 vs FP16 vs BF16) and
the FP16 and BF16 error against FP32, on the shipped checkpoint. Prints a table and writes JSON to argv[1].

    python3 scripts/gpu_torch_cuda.py gpu.json      # on a machine with an NVIDIA GPU
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from gemx.frames import sample_frames
from gemx.metrics import psnr_db
from gemx.model import load_checkpoint
from gemx.model.lr import downsample
from gemx.runtimes.torch_cuda_session import TorchCudaSession


def p50_ms(fn, iters: int = 200, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.percentile(times, 50))


def main(out: str) -> None:
    model = load_checkpoint(None).model
    cfg = model.config
    frames, source = sample_frames(cfg.size, 12)
    target = downsample(frames[:1], cfg.scale).numpy()
    targets = downsample(frames[10:12], cfg.scale).numpy()
    rows = []
    precisions = ("fp32", "fp16", "bf16")
    sessions = {(p, g): TorchCudaSession(model, p, cuda_graphs=g) for p in precisions for g in (False, True)}
    for refs in (1, 2, 5, 10):
        r = frames[1:refs + 1].numpy()
        row = {"refs": refs}
        for (precision, graphs), s in sessions.items():
            row[f"encode_{precision}_ms"] = p50_ms(lambda s=s, r=r: s.set_references(r), iters=20, warmup=3)
            s.set_references(r)
            row[f"frame_{precision}_{'graph' if graphs else 'eager'}_ms"] = p50_ms(lambda s=s: s(target))
        outs = {p: [sessions[(p, True)](t[None]) for t in targets] for p in precisions}
        for p in precisions[1:]:
            row[f"{p}_psnr_vs_fp32_db"] = min(psnr_db(a, b) for a, b in zip(outs[p], outs["fp32"], strict=True))
            row[f"{p}_max_abs_vs_fp32"] = max(float(np.abs(a - b).max()) for a, b in zip(outs[p], outs["fp32"], strict=True))
        rows.append(row)
    device = torch.cuda.get_device_name(0)
    print(f"{device}, torch {torch.__version__}, shipped small_x4 (256x256, 8x8 blocks), frames: {source}")
    keys = [k for k in rows[0] if k != "refs"]
    print("refs " + " ".join(f"{k:>24s}" for k in keys))
    for row in rows:
        print(f"{row['refs']:4d} " + " ".join(f"{row[k]:24.3f}" for k in keys))
    with open(out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "frames": source, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_torch_cuda.json")

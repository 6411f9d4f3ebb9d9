"""Frames of B streams per execution: per-frame time t(B) on the shipped checkpoint, and the streams one device
holds from it. Prints a table and writes JSON to --out.

    python3 scripts/gpu_batching.py --out gpu_batching.json                              # torch-cuda FP16, CUDA graphs
    python3 scripts/gpu_batching.py --runtime openvino --precision int8 --budget-ms 40 --fps 25 --out cpu.json

torch-cuda runs the frame graph module on B stacked caches with one CUDA graph captured per B (timed by CUDA
events); other runtimes run `Session.decode_batch` (timed by the wall clock). A device holds
    streams = max over B with t_batch(B) <= budget of floor(B / t_batch(B) / fps)
calls at `fps`: batches of B frames back to back, each done within the latency budget.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from gpu_torch_cuda import p50_ms  # CUDA-event timing (scripts/ is on the path when a script runs)

from gemx.contract import Contract
from gemx.exporter.cache import cached_export
from gemx.exporter.graphs import FrameGraph, ReferenceEncoderGraph
from gemx.frames import sample_frames
from gemx.model import load_checkpoint
from gemx.model.lr import downsample
from gemx.runtimes.cpu import cpu_flags, cpu_model
from gemx.runtimes.registry import open_session


def wall_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50))


def torch_cuda_batches(model, precision: str, refs: int, batches: list[int], frames: torch.Tensor, iters: int) -> dict[int, float]:
    contract = Contract(model.config, precision)
    encoder = ReferenceEncoderGraph(model, contract).cuda().eval()
    frame = FrameGraph(model, contract).cuda().eval()
    out = {}
    with torch.inference_mode():
        caches = [encoder(frames[1 + (k % (len(frames) - 1)):][:refs].roll(k, 0).cuda()) for k in range(max(batches))]
        for b in batches:
            kv = tuple(torch.cat(parts) for parts in zip(*caches[:b], strict=True))
            target = downsample(frames[:1], model.config.scale).repeat(b, 1, 1, 1).cuda()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    frame(target, kv)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                frame(target, kv)
            out[b] = p50_ms(graph.replay, iters, warmup=10)
            del graph, kv
            torch.cuda.empty_cache()
    return out


def session_batches(runtime: str, precision: str, refs: int, batches: list[int], frames: torch.Tensor, iters: int,
                    threads: int | None) -> dict[int, float]:
    ckpt = load_checkpoint(None)
    path, _ = cached_export(ckpt, ckpt.config.block_size, 10, ["fp32", "int8"] if precision == "int8" else ["fp32"])
    out = {}
    with open_session(runtime, path, precision, threads=threads) as s:
        caches = [s.encode(frames[1 + (k % (len(frames) - 1)):][:refs].roll(k, 0).numpy()) for k in range(max(batches))]
        target = downsample(frames[:1], ckpt.config.scale).numpy()
        for b in batches:
            s.decode_batch([target] * b, caches[:b])
            while getattr(s, "_compiling", None):  # OpenVINO compiles a batch's shapes in the background: time that graph
                time.sleep(0.05)
            out[b] = wall_ms(lambda b=b: s.decode_batch([target] * b, caches[:b]), iters, warmup=2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", default="torch-cuda")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--refs", default="1,5")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--budget-ms", type=float, default=10.0, help="each batch done within this")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    model = load_checkpoint(None).model
    frames, source = sample_frames(model.config.size, 12)
    refs_list, batches = [int(r) for r in a.refs.split(",")], [int(b) for b in a.batches.split(",")]
    rows = []
    for refs in refs_list:
        if a.runtime == "torch-cuda":
            t = torch_cuda_batches(model, a.precision, refs, batches, frames, a.iters)
        else:
            t = session_batches(a.runtime, a.precision, refs, batches, frames, a.iters, a.threads)
        for b, ms in t.items():
            fits = ms <= a.budget_ms
            rows.append({"refs": refs, "batch": b, "batch_ms": ms, "frame_ms": ms / b, "frames_per_s": 1e3 * b / ms,
                         "within_budget": fits, "streams": int(1e3 * b / ms / a.fps) if fits else 0})
    device = torch.cuda.get_device_name(0) if a.runtime == "torch-cuda" else f"{cpu_model()} ({' '.join(cpu_flags())})"
    print(f"{device}: {a.runtime} {a.precision}, torch {torch.__version__}, shipped small_x4 (256x256), frames: {source}")
    print(f"{'refs':>4} {'B':>4} {'batch ms':>9} {'frame ms':>9} {'frames/s':>9} {'streams@' + format(a.fps, 'g'):>11}")
    for r in rows:
        print(f"{r['refs']:4d} {r['batch']:4d} {r['batch_ms']:9.2f} {r['frame_ms']:9.2f} {r['frames_per_s']:9.0f} "
              f"{r['streams'] if r['within_budget'] else '-':>11}")
    best = {refs: max((r["streams"] for r in rows if r["refs"] == refs), default=0) for refs in refs_list}
    for refs, n in best.items():
        print(f"{refs} reference(s): {n} streams at {a.fps:g} fps, each batch within {a.budget_ms:g} ms")
    with open(a.out, "w") as f:
        json.dump({"device": device, "runtime": a.runtime, "precision": a.precision, "fps": a.fps, "budget_ms": a.budget_ms,
                   "torch": torch.__version__, "frames": source, "rows": rows, "streams": best}, f, indent=2)


if __name__ == "__main__":
    main()

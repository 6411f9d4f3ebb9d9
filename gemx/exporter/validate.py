"""Numerical checks of exported graphs against the PyTorch model, through ONNX Runtime on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gemx.contract import VALIDATE_BATCH, Contract
from gemx.metrics import psnr_db
from gemx.model.lr import downsample
from gemx.model.network import GeminoAttention

FP32_TOLERANCE = 1e-4
BATCH_TOLERANCE = 1e-5  # a batch's frames against the same frames run one by one, in the same graphs
FP16_PSNR_GOAL = 50.0
INT8_PSNR_GOAL = 40.0  # composed INT8 graphs vs FP32; measured about 54-57 dB on the test videos


@dataclass
class ParityRow:
    refs: int
    max_abs_error: float
    psnr_db: float  # of the exported output against the reference output
    size: list[int] | None = None  # HR height and width (the frames' own when None)


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_pipeline(encoder, frame, contract: Contract, refs_hr: np.ndarray, target_lr: np.ndarray) -> np.ndarray:
    """Composed encoder + frame graphs: what a deployment computes for one frame."""
    return run_frame(frame, contract, target_lr, encoder.run([s.name for s in contract.kv], {"references": refs_hr}))


def run_frame(frame, contract: Contract, target_lr: np.ndarray, kv: list[np.ndarray]) -> np.ndarray:
    """The frame graph on target_lr [N, 3, h, w] and the encoder's outputs (or N streams' stacked)."""
    return frame.run(["frame_hr"], {"target_lr": target_lr, **{s.name: t for s, t in zip(contract.kv, kv, strict=True)}})[0]


def check_parity(model: GeminoAttention, contract: Contract, paths: tuple[Path, Path], refs_list: list[int],
                 frames: torch.Tensor, reference_paths: tuple[Path, Path] | None = None,
                 sizes: list[tuple[tuple[int, int], int]] = ()) -> list[ParityRow]:
    """Max abs error and PSNR of the composed graphs against torch (or, for FP16 and INT8, against the FP32 graphs
    at `reference_paths`) at each reference count, then at each (size, refs) of `sizes` (the frames resized).
    `frames` [T, 3, H, W]: frame 0 is the target."""
    encoder, frame = (ort_session(p) for p in paths)
    baseline = tuple(ort_session(p) for p in reference_paths) if reference_paths else None
    fp32 = Contract(contract.config, "fp32")
    cases = [(None, r) for r in refs_list] + list(sizes)
    rows = []
    for size, r in cases:
        at = frames if size is None else F.interpolate(frames, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
        target_lr = downsample(at[:1], contract.config.scale)
        refs = at[1 + np.arange(r) % (len(at) - 1)]
        if baseline:
            want = run_pipeline(*baseline, fp32, refs.numpy(), target_lr.numpy())
        else:
            with torch.no_grad():
                want = model(target_lr, refs[None]).numpy()
        got = run_pipeline(encoder, frame, contract, refs.numpy(), target_lr.numpy())
        rows.append(ParityRow(r, float(np.abs(got - want).max()), psnr_db(got, want), list(size) if size else None))
    return rows


def check_batch(paths: tuple[Path, Path], contract: Contract, frames: torch.Tensor, streams: int = VALIDATE_BATCH) -> float:
    """Max abs difference between the frame graph run on `streams` streams at once (their caches stacked, each its
    own references) and the same frames run one at a time: the batch axis must not mix streams."""
    encoder, frame = (ort_session(p) for p in paths)
    names = [s.name for s in contract.kv]
    caches, targets = [], []
    for k in range(streams):
        refs = frames[1:].roll(k, dims=0)[:2]  # each stream its own reference set
        caches.append(encoder.run(names, {"references": refs.numpy()}))
        targets.append(downsample(frames[k % len(frames):][:1], contract.config.scale).numpy())
    one_by_one = [run_frame(frame, contract, t, kv) for t, kv in zip(targets, caches, strict=True)]
    stacked = [np.concatenate(parts) for parts in zip(*caches, strict=True)]
    batched = run_frame(frame, contract, np.concatenate(targets), stacked)
    return float(np.abs(batched - np.concatenate(one_by_one)).max())

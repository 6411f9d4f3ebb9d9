"""`gemx eval`: the paper's quality table on held-out videos.

Per test video: references are frames 0, 15, 30, 45, 60 (the first 1, 2 or 5 of them), test frames
are 64 onward. Rows: bicubic, the SISR baseline, the attention model at 1, 2 and 5 references, and at
5 references taken from a different person's video. PSNR and SSIM in dB (-10 log10(1 - SSIM)) as
mean and 5th/1st percentiles over frames, plus the mean over videos of per-video mean PSNR (the bar
the shipped checkpoint is held to). LPIPS (mean and 95th/99th percentiles) runs when the user supplies
its weights; they cannot be downloaded here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gemx.errors import GemxError, check_positive
from gemx.frames import cached_frames, to_tensor
from gemx.metrics import psnr, ssim_db, summarize
from gemx.model.lr import downsample, upsample_bicubic
from gemx.model.network import GeminoAttention

REFERENCE_FRAMES = (0, 15, 30, 45, 60)
CROPS = ("square", "native")
FIRST_TEST_FRAME = 64


@dataclass
class EvalRow:
    name: str
    psnr: dict
    ssim_db: dict
    video_mean_psnr: float  # mean over videos of the per-video mean PSNR
    per_video: dict[str, float] = field(default_factory=dict)
    lpips: dict | None = None


@dataclass
class Case:
    name: str
    model: GeminoAttention | None  # None: bicubic
    refs: int = 0
    other_person: bool = False


def cases(models: dict[str, GeminoAttention]) -> list[Case]:
    """The table's rows for the given models ({label: model}); SISR models take no references."""
    out = [Case("bicubic", None)]
    for label, m in models.items():
        if m.config.arch == "sisr":
            out.append(Case(label, m))
            continue
        out += [Case(f"{label} {r} ref{'s' if r > 1 else ''}", m, r) for r in (1, 2, 5)]
        out.append(Case(f"{label} 5 refs, other person", m, 5, other_person=True))
    return out


@torch.inference_mode()
def evaluate(models: dict[str, GeminoAttention], videos: list[Path], size: int, scale: int, stride: int = 2,
             progress=lambda done, total: None, lpips=None, crop: str = "square") -> list[EvalRow]:
    """`crop`: "square" (the paper's protocol: every frame centre-cropped and resized to the training size) or
    "native" (each video at its own geometry, cut below and right to a multiple of the scale; frames off the model's
    grid are padded by edge replication and the output cropped back, as a session does; references of another
    person's video are resized to this video's geometry)."""
    check_positive(stride=stride)
    if crop not in CROPS:
        raise GemxError(f"--crop takes {' or '.join(CROPS)}, got {crop!r}")
    clips = {v.stem: cached_frames(v, size if crop == "square" else None, multiple=scale) for v in videos}
    need = max(FIRST_TEST_FRAME, *REFERENCE_FRAMES) + 1
    short = [f"{name} ({len(clip)})" for name, clip in clips.items() if len(clip) < need]
    if short:
        raise GemxError(f"the evaluation protocol needs clips of at least {need} frames (references at frames {list(REFERENCE_FRAMES)}, "
                        f"targets from frame {FIRST_TEST_FRAME}); too short: {', '.join(short)}")
    names = list(clips)
    todo = cases(models)
    scores = {c.name: {"psnr": [], "ssim": [], "lpips": [], "videos": {}} for c in todo}
    total, done = len(todo) * len(names), 0
    for i, name in enumerate(names):
        clip = clips[name]
        targets = to_tensor(clip[FIRST_TEST_FRAME::stride])
        lr = downsample(targets, scale)
        own = to_tensor(clip[list(REFERENCE_FRAMES)])
        other = to_tensor(clips[names[(i + 1) % len(names)]][list(REFERENCE_FRAMES)])
        if other.shape != own.shape:  # native geometry: the other person's references resized to this video's
            other = F.interpolate(other, size=own.shape[-2:], mode="bicubic", antialias=True).clamp(0, 1)
        for case in todo:
            pred = _predict(case, lr, other if case.other_person else own, scale)
            p, s = psnr(pred.clamp(0, 1), targets), ssim_db(pred.clamp(0, 1), targets)
            scores[case.name]["psnr"] += p.tolist()
            scores[case.name]["ssim"] += s.tolist()
            if lpips is not None:
                scores[case.name]["lpips"] += lpips(pred.clamp(0, 1), targets).tolist()
            scores[case.name]["videos"][name] = float(p.mean())
            done += 1
            progress(done, total)
    return [EvalRow(c.name, summarize(scores[c.name]["psnr"]), summarize(scores[c.name]["ssim"]),
                    float(np.mean(list(scores[c.name]["videos"].values()))), scores[c.name]["videos"],
                    summarize(scores[c.name]["lpips"], higher_is_better=False) if lpips is not None else None)
            for c in todo]


def _predict(case: Case, lr: torch.Tensor, references: torch.Tensor, scale: int) -> torch.Tensor:
    """The case's frames for LR targets [T, 3, h, w], with its first `case.refs` of `references` [5, 3, H, W]."""
    if case.model is None:
        return upsample_bicubic(lr, scale)
    h, w = lr.shape[-2] * scale, lr.shape[-1] * scale
    grid = case.model.config.grid
    padded = (-(-h // grid) * grid, -(-w // grid) * grid)  # a session's padding: edge replication below and right
    lr = _pad_edges(lr, (padded[0] // scale, padded[1] // scale))
    if case.model.config.arch == "sisr":
        return torch.cat([case.model(x[None]) for x in lr])[..., :h, :w]
    refs = _pad_edges(references[: case.refs], padded)
    cache = case.model.encode_references(refs)
    return torch.cat([case.model.attend_and_decode(x[None], cache) for x in lr])[..., :h, :w]


def _pad_edges(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A session's padding (`gemx.runtimes.base.pad_edges`) for the PyTorch model: edge replication below and right."""
    h, w = x.shape[-2:]
    return x if (h, w) == tuple(size) else F.pad(x, (0, size[1] - w, 0, size[0] - h), mode="replicate")

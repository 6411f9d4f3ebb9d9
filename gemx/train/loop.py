"""`gemx train`: the paper's recipe scaled to a CPU.

1 reference while training, random 90-degree rotations, Adam with the learning rate x0.46 halfway,
L1 + a perceptual term. Checkpoints are written atomically every few steps and on Ctrl-C; running the
same command again resumes from the last one without losing steps, and the same seed gives the same run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gemx.errors import GemxError, check_positive
from gemx.frames import cached_frames
from gemx.model.checkpoint import load_checkpoint, save_checkpoint
from gemx.model.config import ModelConfig
from gemx.model.lr import downsample
from gemx.model.network import GeminoAttention, build_model
from gemx.train.data import ReferencePairs
from gemx.train.losses import SuperResolutionLoss

LR_DECAY = 0.46  # the paper's learning-rate factor, applied halfway


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 8
    crop: int = 128  # train on block-grid-aligned crops: same blocks as full frames, 4x cheaper
    lr: float = 5e-4
    seed: int = 0
    mismatch: float = 0.0  # share of samples with references from another person
    checkpoint_every: int = 200
    init_from: str | None = None  # warm start (e.g. the robust variant from the paper-exact model)
    vgg_weights: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        check_positive(steps=self.steps, batch_size=self.batch_size, crop=self.crop, checkpoint_every=self.checkpoint_every,
                       threads=self.threads)
        if not self.lr > 0 or not 0 <= self.mismatch <= 1:
            raise GemxError(f"--lr must be positive and --mismatch between 0 and 1, got {self.lr} and {self.mismatch}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * (LR_DECAY if step >= cfg.steps // 2 else 1.0)


def warm_start(model: GeminoAttention, source: GeminoAttention) -> None:
    """Copy every matching weight; a layer that gained input channels keeps the old ones and starts
    the new ones at zero, so the warm-started model computes exactly what the source did."""
    own = model.state_dict()
    for name, w in source.state_dict().items():
        if name not in own:
            continue
        if own[name].shape == w.shape:
            own[name] = w
        elif own[name].dim() == 4 and own[name].shape[0] == w.shape[0] and own[name].shape[1] > w.shape[1]:
            grown = torch.zeros_like(own[name])
            grown[:, : w.shape[1]] = w
            own[name] = grown
    model.load_state_dict(own)


def train(model_config: ModelConfig, cfg: TrainConfig, videos: list[Path], out: Path,
          progress=None, force: bool = False) -> Path:
    """Train and write `out` (a checkpoint); resumes if `out` holds an unfinished run of the same config."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = 0
    if out.exists():
        start = _resume(out, model, opt, model_config, cfg, force)
    elif cfg.init_from:
        warm_start(model, load_checkpoint(cfg.init_from).model)
    if start >= cfg.steps:
        return out
    grid = model_config.grid
    if cfg.crop % grid or cfg.crop > model_config.size:
        raise GemxError(f"crop {cfg.crop} must be a multiple of {grid} (the coarsest attention block in pixels) and <= {model_config.size}")
    clips = [cached_frames(v, model_config.size) for v in videos]
    data = ReferencePairs(clips, cfg.crop, grid, refs=1, mismatch=cfg.mismatch, seed=cfg.seed)
    loss_fn = SuperResolutionLoss(Path(cfg.vgg_weights) if cfg.vgg_weights else None)
    meta = {"train": {**dataclasses.asdict(cfg), "loss": loss_fn.description,
                      "videos": [v.name for v in videos]}}
    model.train()
    wall = time.monotonic()
    elapsed_before = 0.0
    if out.exists():
        elapsed_before = load_checkpoint(out).meta.get("train", {}).get("wall_seconds", 0.0)
    done = start  # optimizer steps completed: what a checkpoint records and a resume continues from

    def checkpoint(done: int) -> None:
        meta["train"].update(steps_done=done, wall_seconds=elapsed_before + time.monotonic() - wall)
        state = {"step": done, "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg)}
        save_checkpoint(out, model, meta, train_state=None if done >= cfg.steps else state)

    try:
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            batch = data.batch(step, cfg.batch_size)
            lr = downsample(batch.target_hr, model_config.scale)
            pred = model(lr, batch.refs_hr)
            loss = loss_fn(pred, batch.target_hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step + 1
            if progress:
                progress(done, cfg.steps, loss.item())
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint(done)
        checkpoint(cfg.steps)
    except KeyboardInterrupt:
        checkpoint(done)
        raise
    return out


def _resume(out: Path, model, opt, model_config: ModelConfig, cfg: TrainConfig, force: bool) -> int:
    ckpt = load_checkpoint(out)
    state = ckpt.train_state
    if state is None or ckpt.config != model_config:
        if force:
            return 0
        what = "a finished run" if state is None else "a run of another model"
        raise GemxError(f"{out} already holds {what}; choose another --out or pass --force to start over")
    if state["config"]["seed"] != cfg.seed or state["config"]["steps"] != cfg.steps:
        raise GemxError(f"{out} is a run with seed {state['config']['seed']} and {state['config']['steps']} steps; "
                        "resume it with the same --seed and --steps, or pass --force to start over")
    model.load_state_dict(ckpt.model.state_dict())
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])

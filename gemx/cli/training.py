"""`gemx train | eval`: training on talking-head clips and the paper's quality table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gemx.cli._app import check_outputs, command, console, lit
from gemx.errors import GemxError
from gemx.fs import atomic_write


@command
def train(
    out: Annotated[Path, typer.Option(help="checkpoint to write; running the same command again resumes it")],
    preset: Annotated[str, typer.Option(help="model preset: paper, small, tiny")] = "small",
    arch: Annotated[str, typer.Option(help="attention (the paper's model), sisr or coarse (the baselines)")] = "attention",
    robust: Annotated[bool, typer.Option("--robust", help="decoder also sees the target's own features")] = False,
    residual: Annotated[bool, typer.Option("--residual", help="predict a correction to the bicubic upsample")] = False,
    scale: Annotated[int, typer.Option(help="LR factor, 4 or 8")] = 4,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 4000,
    batch_size: Annotated[int, typer.Option(help="samples per step")] = 8,
    crop: Annotated[int, typer.Option(help="training crop side (block-grid aligned)")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate (x0.46 halfway)")] = 5e-4,
    mismatch: Annotated[float, typer.Option(help="share of samples with references from another person")] = 0.0,
    init_from: Annotated[Path | None, typer.Option(help="warm-start from this checkpoint (new input channels start at zero)")] = None,
    vgg_weights: Annotated[Path | None, typer.Option(help="torchvision VGG-19 state dict for the feature-matching loss")] = None,
    videos: Annotated[Path | None, typer.Option(help="folder of talking-head .mp4 clips (required; split by person)")] = None,
    seed: Annotated[int, typer.Option(help="seed: the same seed gives the same run")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 200,
    force: Annotated[bool, typer.Option("--force", help="start over even if OUT holds another run")] = False,
):
    """Train on talking-head videos (train split), with 1 reference per sample as in the paper."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gemx.model.config import preset as make_preset
    from gemx.train.data import split_videos
    from gemx.train.loop import TrainConfig
    from gemx.train.loop import train as run_train

    tc = TrainConfig(steps, batch_size, crop, lr, seed, mismatch, checkpoint_every,
                     str(init_from) if init_from else None, str(vgg_weights) if vgg_weights else None, threads)
    cfg = make_preset(preset, arch=arch, robust=robust, residual=residual, scale=scale)
    train_videos, _ = split_videos(videos)
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TextColumn("{task.fields[rate]} steps/s"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), rate="-")

        def advance(step: int, total: int, loss: float) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=step, loss=loss, rate=f"{speed:.2f}" if speed else "-")

        run_train(cfg, tc, train_videos, out, force=force, progress=advance)
    console.print(f"wrote [bold]{lit(out)}[/]")


@command
def eval(
    ckpt: Annotated[list[Path], typer.Argument(help="checkpoints to compare (attention models and/or SISR baselines)")],
    videos: Annotated[Path | None, typer.Option(help="folder of talking-head .mp4 clips (required; split by person)")] = None,
    stride: Annotated[int, typer.Option(help="evaluate every Nth test frame")] = 2,
    lpips_weights: Annotated[Path | None, typer.Option(help="LPIPS-VGG weights (VGG-16 features + lin0..4) to also report LPIPS")] = None,
    runtime: Annotated[str, typer.Option(help="torch (the checkpoints themselves) or a runtime running their exported "
                                              "graphs (ort, openvino, ...)")] = "torch",
    precision: Annotated[str, typer.Option(help="with a runtime: precisions to compare, e.g. fp32,bf16,int8 (one row set each)")] = "fp32",
    crop: Annotated[str, typer.Option(help="square: frames centre-cropped and resized to the training size (the paper's "
                                           "protocol); native: each video at its own geometry")] = "square",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the table as JSON")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --json file")] = False,
):
    """The paper's quality table on the held-out test split: PSNR and SSIM (dB), mean and 5th/1st percentiles."""
    import json as _json
    from dataclasses import asdict

    from rich.progress import Progress

    from gemx.model import load_checkpoint
    from gemx.train.data import split_videos
    from gemx.train.evaluate import evaluate

    check_outputs([json_out], force)
    _, test_videos = split_videos(videos)
    loaded = [load_checkpoint(p) for p in ckpt]
    configs = {(c.config.size, c.config.scale) for c in loaded}
    if len(configs) > 1:
        raise GemxError(f"checkpoints differ in frame size or scale ({sorted(configs)}); compare like with like")
    size, scale = configs.pop()
    models = {p.stem: c.model for p, c in zip(ckpt, loaded, strict=True)}
    if runtime != "torch":
        from gemx.runtimes.registry import deployed_models

        models = deployed_models(loaded, runtime, [p.strip() for p in precision.split(",") if p.strip()],
                                 progress=lambda msg: console.print(msg, markup=False, highlight=False))
    lpips = None
    if lpips_weights is not None:
        from gemx.lpips import LPIPS

        lpips = LPIPS(lpips_weights)
    with Progress(console=console) as bar:
        task = bar.add_task("evaluating", total=None)
        rows = evaluate(models, test_videos, size, scale, stride, progress=lambda d, t: bar.update(task, completed=d, total=t),
                        lpips=lpips, crop=crop)
    base = rows[0].video_mean_psnr
    geometry = f"{size}x{size} squares" if crop == "square" else "each video's own geometry"
    table = Table(title=f"test split ({', '.join(v.stem for v in test_videos)}), x{scale}, {geometry}, every {stride} "
                        "frame(s) from 64")
    lpips_cols = ("LPIPS mean", "p95", "p99") if lpips else ()
    for col in ("model", "PSNR mean", "p5", "p1", "SSIM dB mean", "p5", "p1", *lpips_cols, "video-mean PSNR", "vs bicubic"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        lp = [f"{r.lpips[k]:.4f}" for k in ("mean", "p95", "p99")] if lpips else []
        table.add_row(lit(r.name), *(f"{r.psnr[k]:.2f}" for k in ("mean", "p5", "p1")),
                      *(f"{r.ssim_db[k]:.2f}" for k in ("mean", "p5", "p1")), *lp, f"{r.video_mean_psnr:.2f}",
                      f"{r.video_mean_psnr - base:+.2f}")
    console.print(table)
    if lpips is None:
        console.print("[dim]LPIPS not computed: pass --lpips-weights (its weights cannot be downloaded here).[/]")
    if json_out:
        atomic_write(json_out, lambda tmp: tmp.write_text(_json.dumps([asdict(r) for r in rows], indent=2) + "\n"), overwrite=force)
        console.print(f"wrote {json_out}", markup=False, highlight=False)

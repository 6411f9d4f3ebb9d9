"""`gemx upscale`: a real video, super-resolved in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gemx.cli._app import command, console, lit
from gemx.errors import GemxError


@command
def upscale(
    input: Annotated[Path, typer.Argument(help="low-resolution video (with --simulate: a high-resolution one)")],
    output: Annotated[Path, typer.Argument(help="output video (.mp4/.mkv/.mov) or a directory for lossless PNG frames")],
    references: Annotated[Path | None, typer.Option(help="HR reference frames of the same person: images, a folder, or a video")] = None,
    refs: Annotated[int, typer.Option(min=1, help="number of references, chosen to be diverse")] = 5,
    ckpt: Annotated[Path | None, typer.Option(help="checkpoint (default: the shipped one)")] = None,
    runtime: Annotated[str, typer.Option(help="auto (measures the runtimes here once per export and machine, and picks the fastest), "
                                              "torch, ort, openvino, torch-cuda, ort-cuda, ort-tensorrt or tensorrt")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32; int8 (ort, openvino, tensorrt); bf16 (openvino); fp16 (GPU runtimes). With "
                                                "--runtime auto, the least precise allowed")] = "fp32",
    calib: Annotated[list[Path] | None, typer.Option(help="INT8 calibration video or folder (repeatable; the shipped "
                                                         "checkpoint needs none)")] = None,
    scale: Annotated[int | None, typer.Option(help="expected scale factor; must match the checkpoint's")] = None,
    simulate: Annotated[bool, typer.Option("--simulate", help="INPUT is HR: make LR + references from it, report PSNR/SSIM")] = False,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="write bicubic | gemx | original side by side")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
    crop: Annotated[str, typer.Option(help="native: the video's own geometry; square: centre square at the model's "
                                           "training size (the paper's protocol)")] = "native",
    force: Annotated[bool, typer.Option("--force", help="replace OUTPUT if it exists")] = False,
):
    """Super-resolve a talking-head video from a few high-resolution references.

    The output keeps the video's geometry: a W x H LR video becomes (W*scale) x (H*scale), and references must be
    frames of that size; with --simulate a high-resolution video keeps its size (cropped by at most scale-1 pixels
    to a multiple of the scale). The output has the input's frame rate, frame count and audio. --crop square
    centre-crops every frame to a square at the model's training size instead.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gemx.model import load_checkpoint
    from gemx.video.upscale import UpscaleOptions
    from gemx.video.upscale import upscale as run_upscale

    if scale is not None and (trained := load_checkpoint(ckpt).config.scale) != scale:
        raise GemxError(f"--scale {scale} does not match the checkpoint's scale {trained}; pass a checkpoint trained for that scale")
    opts = UpscaleOptions(references, refs, runtime, simulate, side_by_side, force, threads, precision, list(calib or []), crop)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} fps"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("upscaling", total=None, rate="-")

        def advance(done: int, total: int) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=done, total=total or None, rate=f"{speed:.1f}" if speed else "-")

        result = run_upscale(input, output, opts, ckpt, progress=advance, status=lambda msg: bar.update(task, description=msg))
    console.print(f"references: frames {result.reference_indices} of {lit(result.reference_source)} (encoded {result.encoder_runs}x)")
    render_geometry(result)
    h, w = result.size
    if result.choice:
        console.print(f"--runtime auto chose {lit(result.choice)}")
    console.print(f"wrote [bold]{lit(result.output)}[/]: {result.frames} frames, {w}x{h}, {float(result.fps):.2f} fps, "
                  f"runtime {result.runtime} {result.precision}")
    if result.metrics:
        for name, m in result.metrics.items():
            console.print(f"  {name:8s} PSNR {m['psnr']:.2f} dB   SSIM {m['ssim_db']:.2f} dB")


def render_geometry(result) -> None:
    rows, cols = result.cropped
    if rows or cols:
        console.print(f"cropped the input by {cols} column(s) and {rows} row(s) (right and bottom) to a multiple of the scale",
                      highlight=False)

"""The `gemx` command line: parse, call one library function, render with rich.

Every command's work is a library function; this module only turns arguments into calls and
results into tables. A `GemxError` becomes one red line and exit code 1.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemx.errors import GemxError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
if not console.is_terminal:  # piped or captured: wide enough for the profile table
    console = Console(width=160)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """gemx: deploy multi-reference talking-head super-resolution (export, build, profile, upscale)."""


def command(fn):
    """Register a CLI command whose GemxErrors are reported as one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GemxError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return app.command()(wrapper)


def _load_model(ckpt: Path | None, preset_name: str | None):
    from gemx.model import build_model, load_checkpoint, preset

    if ckpt is not None and preset_name is not None:
        raise GemxError("pass either a checkpoint or --preset, not both")
    if preset_name is not None:
        return build_model(preset(preset_name)).eval(), f"preset {preset_name} (untrained)"
    loaded = load_checkpoint(ckpt)
    return loaded.model, str(loaded.path)


def _si(n: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".strip()


@command
def info(
    ckpt: Annotated[Path | None, typer.Argument(help="checkpoint (.pt); default: the shipped one")] = None,
    preset: Annotated[str | None, typer.Option(help="describe an untrained model of this preset instead")] = None,
    refs: Annotated[int, typer.Option(min=1, help="reference count for FLOPs and cache size")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
):
    """Print a model's config, parameters per part, and FLOPs of reference encoding vs per-frame work."""
    from gemx.model.summary import describe

    model, source = _load_model(ckpt, preset)
    d = describe(model, refs)
    if as_json:
        print(json.dumps({"source": source, **d}, indent=2))
        return
    table = Table(title=f"gemx model: {source}", show_header=False)
    for k, v in d["config"].items():
        table.add_row(k, str(v))
    for k, v in d["parameters"].items():
        table.add_row(f"params: {k}", f"{v:,}")
    table.add_row(f"FLOPs: encode {refs} reference(s), once", _si(d["flops"]["encode_references"], "FLOP"))
    table.add_row("FLOPs: attend + decode, per frame", _si(d["flops"]["attend_and_decode"], "FLOP"))
    table.add_row("key/value cache", _si(d["kv_cache_bytes"], "B"))
    console.print(table)


@command
def export(
    ckpt: Annotated[Path | None, typer.Argument(help="checkpoint (.pt); default: the shipped one")] = None,
    out: Annotated[Path | None, typer.Option(help="export directory; default: <ckpt>-b<B>.export next to the checkpoint")] = None,
    block_size: Annotated[int | None, typer.Option(help="attention block size to deploy with (default: the checkpoint's)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18-23)")] = 20,
    max_refs: Annotated[int, typer.Option(help="largest reference count the graphs are validated for")] = 10,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write mixed-precision FP16 graphs (softmax and logits in FP32)")] = False,
    simplify: Annotated[bool, typer.Option("--simplify", help="simplify graphs with onnxslim, parity re-checked")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing export directory")] = False,
):
    """Export split ONNX graphs (reference encoder + per-frame) with a dynamic `refs` axis and a manifest."""
    from gemx.exporter.export import ExportOptions
    from gemx.exporter.export import export as run_export

    opts = ExportOptions(out, block_size, opset, max_refs, fp16, simplify, force)
    with console.status("exporting") as status:
        result = run_export(ckpt, opts, progress=lambda msg: status.update(msg))
    render_export(result)


def render_export(result) -> None:
    from gemx.exporter.validate import FP16_PSNR_GOAL, FP32_TOLERANCE

    table = Table(title=f"parity of the composed graphs (ONNX Runtime CPU, {result.frames_source})")
    for col in ("precision", "against", "refs", "max abs error", "PSNR dB", "verdict"):
        table.add_column(col)
    for precision, rows in result.parity.items():
        against = result.manifest["precisions"][precision]["parity_against"]
        for r in rows:
            ok = r.max_abs_error <= FP32_TOLERANCE if precision == "fp32" else r.psnr_db > FP16_PSNR_GOAL
            table.add_row(precision, against, str(r.refs), f"{r.max_abs_error:.2e}", f"{r.psnr_db:.1f}",
                          "[green]ok[/]" if ok else "[red]over budget[/]")
    console.print(table)
    if "fp16" in result.parity:
        console.print("[dim]ONNX Runtime's CPU provider computes FP16 graphs in FP32 after casting weights; "
                      "GPU FP16 error is measured by `gemx build --fp16`.[/]")
    trt = Table(title=f"TensorRT parser compatibility (op table of TensorRT {result.trt[0].tensorrt_version})")
    for col in ("graph", "ops", "verdict"):
        trt.add_column(col)
    for r in result.trt:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r.op_counts.items()))
        trt.add_row(r.graph, ops, "[green]ok[/]" if r.ok else "[red]" + "; ".join(r.problems[:3]) + "[/]")
    console.print(trt)
    console.print(f"wrote [bold]{result.path}[/] (refs 1..{result.manifest['refs']['max']}, opset {result.manifest['opset']})")


@command
def build(
    export_dir: Annotated[Path, typer.Argument(help="directory written by `gemx export`")],
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 TensorRT engines (needs an NVIDIA GPU and TensorRT)")] = False,
    refs_min: Annotated[int, typer.Option(help="smallest reference count of the engine profile")] = 1,
    refs_opt: Annotated[int, typer.Option(help="reference count TensorRT tunes for")] = 5,
    refs_max: Annotated[int | None, typer.Option(help="largest reference count (default: the export's max)")] = None,
    timing_cache: Annotated[Path | None, typer.Option(help="TensorRT timing cache to reuse across builds")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing build")] = False,
):
    """Build TensorRT engines (GPU) or ORT-optimized CPU graphs, then check their accuracy against FP32 ONNX."""
    from gemx.runtimes.build import BuildOptions
    from gemx.runtimes.build import build as run_build

    opts = BuildOptions(fp16, refs_min, refs_opt, refs_max, timing_cache, force)
    with console.status("building") as status:
        result = run_build(export_dir, opts, progress=lambda msg: status.update(msg))
    if result.target == "ort-cpu":
        console.print("no NVIDIA GPU/TensorRT here: wrote [bold]ONNX Runtime-optimized graphs for the CPU provider[/]")
    acc = result.accuracy
    console.print(f"wrote [bold]{result.path}[/]; accuracy vs FP32 ONNX on {acc['frames']} frames of {acc['source']} "
                  f"at {acc['refs']} refs: PSNR {acc['psnr_db']:.1f} dB, max abs error {acc['max_abs_error']:.2e}")


@command
def runtimes():
    """List the runtimes, whether each can run here, and what is missing where one cannot."""
    from gemx.runtimes.registry import FASTEST_FIRST, resolve_runtime, runtime_available

    table = Table(title="gemx runtimes (fastest first)")
    for col in ("runtime", "available", "why not"):
        table.add_column(col)
    for name in FASTEST_FIRST:
        ok, why = runtime_available(name)
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", why)
    console.print(table)
    console.print(f"--runtime auto picks [bold]{resolve_runtime('auto')}[/]")


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GemxError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise GemxError(f"{what} must be positive integers, got {text!r}")
    return values


@command
def profile(
    source: Annotated[Path | None, typer.Argument(help="checkpoint (.pt) or export directory; default: the shipped checkpoint")] = None,
    refs: Annotated[str, typer.Option(help="reference counts to measure")] = "1,2,5,10",
    block_sizes: Annotated[str | None, typer.Option(help="attention block sizes (default: the checkpoint's and twice it)")] = None,
    runtime: Annotated[str, typer.Option(help="runtimes: torch, ort, ort-cuda, ort-tensorrt, tensorrt, auto")] = "torch,ort",
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 graphs/engines for the GPU runtimes")] = False,
    warmup: Annotated[int, typer.Option(help="untimed calls before timing")] = 3,
    iters: Annotated[int, typer.Option(help="timed per-frame calls")] = 20,
    seconds: Annotated[float | None, typer.Option(help="time each measurement for this long instead of --iters")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the runtime's choice)")] = None,
    naive: Annotated[bool, typer.Option(help="also time the full model re-encoding references every frame")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="where per-block-size exports are kept")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every figure and the machine as JSON")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="write every figure as CSV")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="write a latency-vs-references plot (.png)")] = None,
):
    """Measure reference encoding and per-frame latency, memory and FLOPs across refs, block sizes and runtimes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gemx.profiles import report
    from gemx.profiles.sweep import ProfileOptions
    from gemx.profiles.sweep import profile as run_profile

    opts = ProfileOptions(_int_list(refs, "--refs"), _int_list(block_sizes, "--block-sizes") if block_sizes else None,
                          [r.strip() for r in runtime.split(",") if r.strip()], fp16, warmup, iters, seconds, threads, cache_dir, naive)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("preparing", total=None)
        result = run_profile(source, opts, progress=lambda msg, advance=0: bar.update(task, description=msg, advance=advance),
                             on_total=lambda total: bar.update(task, total=total))
    console.print(report.table(result))
    if result.interrupted:
        console.print("[yellow]interrupted: showing and writing the rows measured so far[/]")
    for path, write in ((json_out, report.write_json), (csv_out, report.write_csv), (plot_out, report.plot)):
        if path is not None:
            write(result, path)
            console.print(f"wrote {path}")


@command
def upscale(
    input: Annotated[Path, typer.Argument(help="low-resolution video (with --simulate: a high-resolution one)")],
    output: Annotated[Path, typer.Argument(help="output video (.mp4/.mkv/.mov) or a directory for lossless PNG frames")],
    references: Annotated[Path | None, typer.Option(help="HR reference frames of the same person: images, a folder, or a video")] = None,
    refs: Annotated[int, typer.Option(min=1, help="number of references, chosen to be diverse")] = 5,
    ckpt: Annotated[Path | None, typer.Option(help="checkpoint (default: the shipped one)")] = None,
    runtime: Annotated[str, typer.Option(help="auto, torch, ort, ort-cuda, ort-tensorrt or tensorrt")] = "auto",
    scale: Annotated[int | None, typer.Option(help="expected scale factor; must match the checkpoint's")] = None,
    simulate: Annotated[bool, typer.Option("--simulate", help="INPUT is HR: make LR + references from it, report PSNR/SSIM")] = False,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="write bicubic | gemx | original side by side")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace OUTPUT if it exists")] = False,
):
    """Super-resolve a talking-head video from a few high-resolution references.

    Frames are centre-cropped to a square and resized to the model's size (LR input: its LR size; with
    --simulate or for references: its HR size). The output has the model's HR size, the input's frame
    rate and frame count, and its audio.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gemx.model import load_checkpoint
    from gemx.video.upscale import UpscaleOptions
    from gemx.video.upscale import upscale as run_upscale

    if scale is not None and (trained := load_checkpoint(ckpt).config.scale) != scale:
        raise GemxError(f"--scale {scale} does not match the checkpoint's scale {trained}; pass a checkpoint trained for that scale")
    opts = UpscaleOptions(references, refs, runtime, simulate, side_by_side, force, threads)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} fps"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("upscaling", total=None, rate="-")

        def advance(done: int, total: int) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=done, total=total or None, rate=f"{speed:.1f}" if speed else "-")

        result = run_upscale(input, output, opts, ckpt, progress=advance, status=lambda msg: bar.update(task, description=msg))
    console.print(f"references: frames {result.reference_indices} of {result.reference_source} (encoded {result.encoder_runs}x)")
    console.print(f"wrote [bold]{result.output}[/]: {result.frames} frames, {result.size}x{result.size}, {float(result.fps):.2f} fps, "
                  f"runtime {result.runtime}")
    if result.metrics:
        for name, m in result.metrics.items():
            console.print(f"  {name:8s} PSNR {m['psnr']:.2f} dB   SSIM {m['ssim_db']:.2f} dB")


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
    videos: Annotated[Path | None, typer.Option(help="folder of talking-head .mp4 clips (default: ../shared/data/videos)")] = None,
    seed: Annotated[int, typer.Option(help="seed: the same seed gives the same run")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 200,
    force: Annotated[bool, typer.Option("--force", help="start over even if OUT holds another run")] = False,
):
    """Train on talking-head videos (train split), with 1 reference per sample as in the paper."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gemx.model.config import preset as make_preset
    from gemx.train.data import SHARED_VIDEOS, split_videos
    from gemx.train.loop import TrainConfig
    from gemx.train.loop import train as run_train

    cfg = make_preset(preset, arch=arch, robust=robust, residual=residual, scale=scale)
    train_videos, _ = split_videos(videos or SHARED_VIDEOS)
    tc = TrainConfig(steps, batch_size, crop, lr, seed, mismatch, checkpoint_every,
                     str(init_from) if init_from else None, str(vgg_weights) if vgg_weights else None, threads)
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TextColumn("{task.fields[rate]} steps/s"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), rate="-")

        def advance(step: int, total: int, loss: float) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=step, loss=loss, rate=f"{speed:.2f}" if speed else "-")

        run_train(cfg, tc, train_videos, out, force=force, progress=advance)
    console.print(f"wrote [bold]{out}[/]")


@command
def eval(
    ckpt: Annotated[list[Path], typer.Argument(help="checkpoints to compare (attention models and/or SISR baselines)")],
    videos: Annotated[Path | None, typer.Option(help="folder of talking-head .mp4 clips (default: ../shared/data/videos)")] = None,
    stride: Annotated[int, typer.Option(help="evaluate every Nth test frame")] = 2,
    lpips_weights: Annotated[Path | None, typer.Option(help="LPIPS-VGG weights (VGG-16 features + lin0..4) to also report LPIPS")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the table as JSON")] = None,
):
    """The paper's quality table on the held-out test split: PSNR and SSIM (dB), mean and 5th/1st percentiles."""
    import json as _json
    from dataclasses import asdict

    from rich.progress import Progress

    from gemx.model import load_checkpoint
    from gemx.train.data import SHARED_VIDEOS, split_videos
    from gemx.train.evaluate import evaluate

    loaded = [load_checkpoint(p) for p in ckpt]
    configs = {(c.config.size, c.config.scale) for c in loaded}
    if len(configs) > 1:
        raise GemxError(f"checkpoints differ in frame size or scale ({sorted(configs)}); compare like with like")
    size, scale = configs.pop()
    models = {p.stem: c.model for p, c in zip(ckpt, loaded, strict=True)}
    _, test_videos = split_videos(videos or SHARED_VIDEOS)
    lpips = None
    if lpips_weights is not None:
        from gemx.lpips import LPIPS

        lpips = LPIPS(lpips_weights)
    with Progress(console=console) as bar:
        task = bar.add_task("evaluating", total=None)
        rows = evaluate(models, test_videos, size, scale, stride, progress=lambda d, t: bar.update(task, completed=d, total=t),
                        lpips=lpips)
    base = rows[0].video_mean_psnr
    table = Table(title=f"test split ({', '.join(v.stem for v in test_videos)}), x{scale}, every {stride} frame(s) from 64")
    lpips_cols = ("LPIPS mean", "p95", "p99") if lpips else ()
    for col in ("model", "PSNR mean", "p5", "p1", "SSIM dB mean", "p5", "p1", *lpips_cols, "video-mean PSNR", "vs bicubic"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        lp = [f"{r.lpips[k]:.4f}" for k in ("mean", "p95", "p99")] if lpips else []
        table.add_row(r.name, *(f"{r.psnr[k]:.2f}" for k in ("mean", "p5", "p1")), *(f"{r.ssim_db[k]:.2f}" for k in ("mean", "p5", "p1")),
                      *lp, f"{r.video_mean_psnr:.2f}", f"{r.video_mean_psnr - base:+.2f}")
    console.print(table)
    if lpips is None:
        console.print("[dim]LPIPS not computed: pass --lpips-weights (its weights cannot be downloaded here).[/]")
    if json_out:
        json_out.write_text(_json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        console.print(f"wrote {json_out}")


def main() -> None:
    app(prog_name="gemx")


if __name__ == "__main__":
    sys.exit(main())

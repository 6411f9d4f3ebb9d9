"""`gemx profile`: the latency/memory/FLOPs sweep as a table, JSON, CSV and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gemx.cli._app import _int_list, _size, check_outputs, command, console
from gemx.fs import stop_handled


@command
def profile(
    source: Annotated[Path | None, typer.Argument(help="checkpoint (.pt) or export directory; default: the shipped checkpoint")] = None,
    refs: Annotated[str, typer.Option(help="reference counts to measure")] = "1,2,5,10",
    block_sizes: Annotated[str | None, typer.Option(help="attention block sizes (default: the checkpoint's and twice it)")] = None,
    runtime: Annotated[str | None, typer.Option(help="runtimes: torch, ort, openvino, torch-cuda, ort-cuda, ort-tensorrt, "
                                                     "tensorrt; auto: all this machine has (default: torch, ort, and "
                                                     "openvino where installed)")] = None,
    precision: Annotated[str, typer.Option(help="precisions to sweep: fp32, int8 (ort, openvino, tensorrt), bf16 (openvino, "
                                                "where the CPU has bf16), fp16 (GPU runtimes); each row gets its PSNR vs FP32")] = "fp32",
    fp16: Annotated[bool, typer.Option("--fp16", help="shorthand for --precision fp16")] = False,
    frames: Annotated[Path | None, typer.Option(help="video to take references and targets from; adds PSNR vs its HR frames")] = None,
    calib: Annotated[list[Path] | None, typer.Option(help="INT8 calibration video or folder (repeatable; the shipped "
                                                         "checkpoint needs none)")] = None,
    warmup: Annotated[int, typer.Option(help="untimed calls before timing")] = 3,
    iters: Annotated[int, typer.Option(help="timed per-frame calls")] = 20,
    seconds: Annotated[float | None, typer.Option(help="time each measurement for this long instead of --iters")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the runtime's choice)")] = None,
    naive: Annotated[bool, typer.Option(help="also time the full model re-encoding references every frame")] = True,
    memory: Annotated[bool, typer.Option(help="measure each CPU session's peak memory in a fresh process (a few seconds "
                                              "per runtime and precision)")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="where per-block-size exports are kept")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every figure and the machine as JSON")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="write every figure as CSV")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="write a latency-vs-references plot (.png)")] = None,
    ops: Annotated[bool, typer.Option("--ops", help="also break ORT CPU per-frame kernel time down by op type")] = False,
    sizes: Annotated[str | None, typer.Option(help="HR frame sizes, WxH or one side for a square, e.g. 256,640x360,1280x720 "
                                                   "(default: the training size)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace existing --json/--csv/--plot files")] = False,
):
    """Measure reference encoding and per-frame latency, memory and FLOPs across refs, block sizes and runtimes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gemx.profiles import report
    from gemx.profiles.sweep import ProfileOptions, default_runtimes
    from gemx.profiles.sweep import profile as run_profile

    outputs = ((json_out, report.write_json), (csv_out, report.write_csv), (plot_out, report.plot))
    check_outputs([path for path, _ in outputs], force)  # before the sweep, not after it
    report.check_plot_path(plot_out)
    opts = ProfileOptions(_int_list(refs, "--refs"), _int_list(block_sizes, "--block-sizes") if block_sizes else None,
                          [r.strip() for r in runtime.split(",") if r.strip()] if runtime is not None else default_runtimes(),
                          ["fp16"] if fp16 else [p.strip() for p in precision.split(",") if p.strip()], warmup, iters, seconds,
                          threads, cache_dir, naive, ops, frames, list(calib or []),
                          [_size(t.strip(), "--sizes") for t in sizes.split(",") if t.strip()] if sizes else None, memory)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("preparing", total=None)
        result = run_profile(source, opts, progress=lambda msg, advance=0: bar.update(task, description=msg, advance=advance),
                             on_total=lambda total: bar.update(task, total=total))
    console.print(report.table(result))
    if result.ops:
        console.print(report.ops_table(result))
    if result.interrupted:
        stop_handled()
        console.print("[yellow]interrupted: showing and writing the rows measured so far[/]")
    for path, write in outputs:
        if path is not None:
            write(result, path, overwrite=force)
            console.print(f"wrote {path}", markup=False, highlight=False)

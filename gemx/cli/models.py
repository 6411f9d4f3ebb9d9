"""`gemx info | export | build | runtimes`: the model, its graphs and what runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gemx.cli._app import _load_model, _si, _size, command, console, lit
from gemx.errors import GemxError


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
    table = Table(title=f"gemx model: {lit(source)}", show_header=False)
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
    frames: Annotated[Path | None, typer.Option(help="video to check parity on (default: synthetic frames)")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="also write INT8 QDQ graphs (for TensorRT and ONNX Runtime CPU)")] = False,
    calib: Annotated[list[Path] | None, typer.Option(help="INT8 calibration video or folder of videos (repeatable); "
                                                         "the shipped checkpoint has its ranges built in")] = None,
    max_size: Annotated[str | None, typer.Option(help="largest frame the graphs are validated for, WxH (default 1920x1088)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing export directory")] = False,
):
    """Export split ONNX graphs (reference encoder + per-frame) with dynamic `refs`, height and width, and a manifest."""
    from gemx.exporter.export import ExportOptions
    from gemx.exporter.export import export as run_export

    if calib and not int8:
        raise GemxError("--calib calibrates INT8 graphs; add --int8")
    opts = ExportOptions(out, block_size, opset, max_refs, fp16, simplify, force, frames, int8, list(calib or []),
                         _size(max_size, "--max-size") if max_size else None)
    with console.status("exporting") as status:
        result = run_export(ckpt, opts, progress=lambda msg: status.update(msg))
    render_export(result)


def render_export(result) -> None:
    from gemx.contract import INT8_KEY_MIN_CHANNELS, Contract
    from gemx.exporter.validate import FP16_PSNR_GOAL, FP32_TOLERANCE, INT8_PSNR_GOAL

    goal = {"fp16": FP16_PSNR_GOAL, "int8": INT8_PSNR_GOAL}

    table = Table(title=f"parity of the composed graphs (ONNX Runtime CPU, {lit(result.frames_source)})")
    for col in ("precision", "against", "size", "refs", "max abs error", "PSNR dB", "verdict"):
        table.add_column(col)
    manifest = result.manifest
    size = manifest.config.size
    for precision, rows in result.parity.items():
        against = manifest.precisions[precision].parity_against
        for r in rows:
            ok = r.max_abs_error <= FP32_TOLERANCE if precision == "fp32" else r.psnr_db > goal[precision]
            h, w = r.size or (size, size)
            table.add_row(precision, against, f"{w}x{h}", str(r.refs), f"{r.max_abs_error:.2e}", f"{r.psnr_db:.1f}",
                          "[green]ok[/]" if ok else "[red]over budget[/]")
    console.print(table)
    if "fp16" in result.parity:
        console.print("[dim]ONNX Runtime's CPU provider computes FP16 graphs in FP32 after casting weights; "
                      "GPU FP16 error is measured by `gemx build --fp16`.[/]")
    if "int8" in result.parity:
        q = manifest.precisions["int8"].quantization
        contract = Contract(manifest.config, "int8")
        float_keys = [s.name for s in contract.keys if s.dtype != "int8"]
        logits = f", the logits over {', '.join(float_keys)} (fewer than {INT8_KEY_MIN_CHANNELS} channels)" if float_keys else ""
        console.print(f"[dim]INT8: {q.method}, calibrated on {q.calibration.frames} frames of "
                      f"{lit(q.calibration.source)}; kept in FP32: the bicubic upsampler, the softmax{logits}; "
                      "the frame graph's head on 2x2 phases (as FP32 but on the frame's outer 2 pixels).[/]")
    trt = Table(title=f"TensorRT parser compatibility (op table of TensorRT {result.trt[0].tensorrt_version})")
    for col in ("graph", "ops", "verdict"):
        trt.add_column(col)
    for r in result.trt:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r.op_counts.items()))
        trt.add_row(r.graph, ops, "[green]ok[/]" if r.ok else "[red]" + lit("; ".join(r.problems[:3])) + "[/]")
    console.print(trt)
    console.print(f"wrote [bold]{lit(result.path)}[/] (refs 1..{manifest.refs.max}, opset {manifest.opset})")


@command
def build(
    export_dir: Annotated[Path, typer.Argument(help="directory written by `gemx export`")],
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 TensorRT engines (needs an NVIDIA GPU and TensorRT)")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 from the export's QDQ graphs: TensorRT engines, or ORT CPU graphs")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="OpenVINO's bf16 mode of the FP32 graphs (--runtime openvino, on a CPU "
                                                      "with bf16)")] = False,
    runtime: Annotated[str | None, typer.Option(help="tensorrt, ort-cpu or openvino (default: TensorRT where it runs, "
                                                     "else ONNX Runtime's CPU graphs)")] = None,
    refs_min: Annotated[int, typer.Option(help="smallest reference count of the engine profile")] = 1,
    refs_opt: Annotated[int | None, typer.Option(help="reference count TensorRT tunes for (default: 5, at most --refs-max)")] = None,
    refs_max: Annotated[int | None, typer.Option(help="largest reference count (default: the export's max)")] = None,
    timing_cache: Annotated[Path | None, typer.Option(help="TensorRT timing cache to reuse across builds")] = None,
    frames: Annotated[Path | None, typer.Option(help="video to check accuracy on (default: synthetic frames)")] = None,
    sizes: Annotated[str | None, typer.Option(help="frame sizes TensorRT tunes for, WxH,... (the first is its optimum; "
                                                   "default: the training size)")] = None,
    max_size: Annotated[str | None, typer.Option(help="largest frame an engine takes, WxH (default: the export's)")] = None,
    max_batch: Annotated[int, typer.Option(help="most frames of different streams one TensorRT frame run takes "
                                                "(a server's --max-batch)")] = 1,
    force: Annotated[bool, typer.Option("--force", help="replace an existing build")] = False,
):
    """Build TensorRT engines (GPU), ORT-optimized CPU graphs, or OpenVINO compiled models, then check their accuracy
    against FP32 ONNX."""
    from gemx.runtimes.build import BuildOptions
    from gemx.runtimes.build import build as run_build

    size_list = [_size(t.strip(), "--sizes") for t in sizes.split(",") if t.strip()] if sizes else []
    opts = BuildOptions(fp16, int8, bf16, runtime, refs_min, refs_opt, refs_max, timing_cache, force, frames, size_list,
                        _size(max_size, "--max-size") if max_size else None, max_batch)
    with console.status("building") as status:
        result = run_build(export_dir, opts, progress=lambda msg: status.update(msg))
    if result.target == "ort-cpu" and runtime is None:
        console.print(f"no NVIDIA GPU/TensorRT here: wrote [bold]ONNX Runtime-optimized {result.record.precision} graphs "
                      "for the CPU provider[/]")
    if result.target == "openvino":
        r = result.record
        console.print(f"compiled with OpenVINO {r.openvino_version} for {lit(r.cpu)} ({' '.join(r.cpu_flags)}), {r.precision}")
    acc = result.accuracy
    console.print(f"wrote [bold]{lit(result.path)}[/]; accuracy vs FP32 ONNX on {acc.frames} frames of {lit(acc.source)} "
                  f"at {acc.refs} refs: PSNR {acc.psnr_db:.1f} dB, max abs error {acc.max_abs_error:.2e}")


@command
def runtimes():
    """List the runtimes, whether each can run here and in which precisions, and the CPU's instruction sets."""
    from gemx.runtimes.cpu import cpu_flags, cpu_model
    from gemx.runtimes.registry import RUNTIMES, precisions_here, runtime_available

    console.print(f"CPU: {lit(cpu_model())}; instruction sets: {' '.join(cpu_flags()) or 'none of note'}")
    table = Table(title="gemx runtimes")
    for col in ("runtime", "available", "precisions here", "why not"):
        table.add_column(col)
    for name in RUNTIMES:
        ok, why = runtime_available(name)
        fast, notes = precisions_here(name)
        why_not = "; ".join(filter(None, [why, *notes]))
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", ", ".join(fast) if ok else "", lit(why_not))
    console.print(table)
    console.print("--runtime auto measures these once per export and machine, and runs the fastest at the precision asked "
                  "(fp32 unless --precision allows less)")

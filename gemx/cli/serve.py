"""`gemx triton | serve | stream | loadtest`: many streams on Triton Inference Server."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gemx.cli._app import _int_list, _size, check_outputs, command, console, lit
from gemx.errors import GemxError
from gemx.fs import stop_handled


@command
def triton(
    export_dir: Annotated[Path, typer.Argument(help="directory written by `gemx export` (and `gemx build`)")],
    out: Annotated[Path, typer.Option(help="model repository to write")],
    runtime: Annotated[str, typer.Option(help="session inside the server: ort, openvino, ort-cuda, ort-tensorrt or tensorrt")] = "ort",
    precision: Annotated[str, typer.Option(help="fp32; int8 (ort, openvino, tensorrt); bf16 (openvino); fp16 (GPU runtimes)")] = "fp32",
    max_refs: Annotated[int | None, typer.Option(help="most references a stream may send (default: the export's)")] = None,
    max_streams: Annotated[int, typer.Option(help="streams the server holds open at once; more wait for a free slot")] = 16,
    kv_budget_mb: Annotated[float, typer.Option(help="key/value memory of all streams; least recently used go first")] = 1024.0,
    idle_timeout: Annotated[float, typer.Option(help="seconds without frames after which a stream is dropped")] = 60.0,
    threads: Annotated[int | None, typer.Option(help="CPU threads of the model's session")] = None,
    instances: Annotated[int, typer.Option(help="model instances (each with its own session and streams)")] = 1,
    max_batch: Annotated[int, typer.Option(help="frames of different streams per model execution (1: one at a time)")] = 1,
    queue_delay_us: Annotated[int | None, typer.Option(help="microseconds a batch may wait to fill (default: 0 on a CPU, "
                                                            "2000 on a GPU)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing repository")] = False,
):
    """Write a Triton model repository: one stateful model holding each stream's key/value cache."""
    from gemx.serving.repository import TritonOptions, write_repository

    opts = TritonOptions(runtime=runtime, precision=precision, max_refs=max_refs, max_streams=max_streams,
                         kv_budget_mb=kv_budget_mb, idle_timeout_s=idle_timeout, threads=threads, instances=instances,
                         max_batch=max_batch, queue_delay_us=queue_delay_us, force=force)
    repo = write_repository(export_dir, out, opts)
    limits, batching = repo.manifest.limits, repo.manifest.batching
    batches = (f", frames of up to {batching.max_batch} streams per execution (waiting at most "
               f"{batching.queue_delay_us} us)" if batching.max_batch > 1 else "")
    console.print(f"wrote [bold]{lit(repo.path)}[/]: model gemx on {opts.runtime} {opts.precision}, up to {limits.max_refs} "
                  f"references and {limits.max_streams} open streams, {limits.kv_budget_mb:g} MB of keys/values "
                  f"({repo.manifest.kv_bytes_per_reference / 2**20:.1f} MB per reference){batches}", highlight=False)
    console.print(f"serve it with: gemx serve {repo.path}", highlight=False, markup=False)


@command
def serve(
    repo: Annotated[Path, typer.Argument(help="repository written by `gemx triton`")],
    grpc_port: Annotated[int, typer.Option(help="gRPC port (streams)")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP port (health, metadata)")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port")] = 8002,
    log: Annotated[Path | None, typer.Option(help="write the server log here")] = None,
):
    """Run Triton Inference Server on 127.0.0.1 with the repository until Ctrl-C."""
    from gemx.serving.server import TritonServer

    server = TritonServer(repo, grpc_port, http_port, metrics_port, log_path=log)
    with console.status("starting tritonserver"):
        server.start()
    _until_stopped(server, "tritonserver", server.log_tail, lambda: console.print(
        f"serving [bold]{lit(repo)}[/] on grpc {server.grpc_url} (streams), {server.http_url} (health), "
        f"metrics :{server.metrics_port}; Ctrl-C stops it", highlight=False))


@command
def balance(
    replicas: Annotated[list[str], typer.Argument(help="gRPC addresses (HOST:PORT) of `gemx serve` replicas of one repository")],
    grpc_port: Annotated[int, typer.Option(help="port the balancer takes gRPC streams on")] = 8001,
    listen: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: reachable from other hosts)")] = "127.0.0.1",
    max_streams: Annotated[int, typer.Option(help="streams each replica takes at once (size it with `gemx loadtest`)")] = 16,
    timeout: Annotated[int, typer.Option(help="seconds a silent stream or a failed replica is given")] = 5,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the nginx configuration and exit")] = False,
):
    """Run nginx as a gRPC load balancer over Triton replicas until Ctrl-C: each call stays on one replica."""
    from gemx.serving.balancer import Balancer, BalancerOptions, nginx_config

    opts = BalancerOptions(tuple(replicas), grpc_port, listen, max_streams, timeout)
    if print_config:
        console.print(nginx_config(opts), markup=False, highlight=False, soft_wrap=True, end="")
        return
    balancer = Balancer(opts).start()
    _until_stopped(balancer, "nginx", balancer.error_tail, lambda: console.print(
        f"balancing gRPC streams on {balancer.grpc_url} over {', '.join(replicas)} (at most {max_streams} streams each); "
        "Ctrl-C stops it", markup=False, highlight=False))


def _until_stopped(server, name: str, log_tail, announce) -> None:
    """Announce a started server (TritonServer, Balancer) and wait in the foreground while it runs: Ctrl-C or SIGTERM
    stops it, as a server is meant to stop (not an error); its own exit is one line with the end of its log. It is
    stopped here whatever happens."""
    try:
        announce()
        while server.process.poll() is None:
            time.sleep(0.5)
        raise GemxError(f"{name} exited with code {server.process.returncode}: {log_tail()}")
    except KeyboardInterrupt:
        stop_handled()
        console.print("stopping")
    finally:
        server.stop()


@command
def stream(
    url: Annotated[str, typer.Argument(help="gRPC address of a gemx server, e.g. 127.0.0.1:8001")],
    input: Annotated[Path, typer.Argument(help="low-resolution video (with --simulate: a high-resolution one)")],
    output: Annotated[Path, typer.Argument(help="output video (.mp4/.mkv/.mov) or a directory for PNG frames")],
    references: Annotated[Path | None, typer.Option(help="HR reference frames of the same person: images, a folder, or a video")] = None,
    refs: Annotated[int, typer.Option(min=1, help="number of references, chosen to be diverse")] = 5,
    simulate: Annotated[bool, typer.Option("--simulate", help="INPUT is HR: make LR + references from it, report PSNR/SSIM")] = False,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="write bicubic | gemx | original side by side")] = False,
    crop: Annotated[str, typer.Option(help="native (the video's geometry) or square (the paper's protocol)")] = "native",
    force: Annotated[bool, typer.Option("--force", help="replace OUTPUT if it exists")] = False,
):
    """Upscale a video through a gemx server as one stream (as `gemx upscale` does in-process)."""
    from gemx.cli.video import render_geometry
    from gemx.serving.client import RemoteStream
    from gemx.video.upscale import UpscaleOptions, upscale

    opts = UpscaleOptions(references, refs, "server", simulate, side_by_side, force, crop=crop)
    with RemoteStream(url) as remote, console.status("streaming") as status:
        result = upscale(input, output, opts, status=lambda msg: status.update(msg),
                         progress=lambda done, total: status.update(f"streaming frame {done}/{total or '?'}"), session=remote)
        recoveries = remote.recoveries
    console.print(f"references: frames {result.reference_indices} of {lit(result.reference_source)} "
                  f"(sent {result.encoder_runs}x, recovered {recoveries}x)", highlight=False)
    render_geometry(result)
    console.print(f"wrote [bold]{lit(result.output)}[/]: {result.frames} frames, {result.size[1]}x{result.size[0]}, "
                  f"{float(result.fps):.2f} fps, via {result.runtime}", highlight=False)
    for name, m in result.metrics.items():
        console.print(f"  {name:8s} PSNR {m['psnr']:.2f} dB   SSIM {m['ssim_db']:.2f} dB")


@command
def loadtest(
    urls: Annotated[list[str], typer.Argument(help="gRPC address of a gemx server, e.g. 127.0.0.1:8001; several (say, "
                                                   "unbatched and batched) are measured in one run, rows interleaved")],
    streams: Annotated[str, typer.Option(help="concurrent stream counts to try")] = "1,2,4",
    fps: Annotated[float, typer.Option(help="frames per second each stream sends")] = 25.0,
    seconds: Annotated[float, typer.Option(help="how long each row runs")] = 10.0,
    refs: Annotated[int, typer.Option(help="references per stream")] = 5,
    video: Annotated[Path | None, typer.Option(help="HR video to take references and frames from (default: synthetic frames)")] = None,
    repo: Annotated[Path | None, typer.Option(help="the served repository: adds a one-stream row run in this process")] = None,
    size: Annotated[str | None, typer.Option(help="HR frame size of every call, WxH (default: the model's training size)")] = None,
    phases: Annotated[str, typer.Option(help="where the calls' frame clocks start within one interval: jittered (seeded, "
                                             "the headline), even (best case), aligned (worst case)")] = "jittered,even,aligned",
    seed: Annotated[int, typer.Option(help="seed of the jittered phases")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the rows as JSON")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --json file")] = False,
):
    """S concurrent real-time streams per row: fps per stream, latency, late/dropped frames, server KV memory."""
    from gemx.serving.loadtest import LoadOptions
    from gemx.serving.loadtest import loadtest as run_loadtest

    check_outputs([json_out], force)
    opts = LoadOptions(_int_list(streams, "--streams"), fps, seconds, refs, video, repo, _size(size, "--size") if size else None,
                       [p.strip() for p in phases.split(",") if p.strip()], seed)
    with console.status("load test") as status:
        result = run_loadtest(urls, opts, progress=lambda msg: status.update(msg))
    table = Table(title=f"streams at {fps:g} fps, {seconds:g} s each, {refs} refs ({result.frame_source})")
    for col in ("server", "phases", "streams", "fps/stream (min)", "p50 ms", "p90 ms", "p99 ms", "late", "dropped", "errors",
                "recovered", "server KV MB", "exec/s", "mean batch", "keeps up"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for r in result.rows:
        server = r.mode == "server"
        table.add_row(lit(r.server) if server else r.mode, r.phases or "-", str(r.streams), f"{r.fps_min:.1f}", f"{r.p50_ms:.1f}",
                      f"{r.p90_ms:.1f}", f"{r.p99_ms:.1f}", str(r.late), str(r.dropped), str(r.errors), str(r.recoveries),
                      f"{r.server_kv_mb:.1f}" if server else "-", f"{r.executions_per_s:.1f}" if server else "-",
                      f"{r.mean_batch:.2f}" if server else "-", "[green]yes[/]" if r.keeps_up else "[red]no[/]")
    console.print(table)
    for r in result.rows:
        if r.first_error:
            console.print(f"{r.server or r.mode}, {r.streams} stream(s): first error: {r.first_error}", markup=False, highlight=False)
    for server in result.servers:
        console.print(f"{lit(server)}: largest stream count that keeps {fps:g} fps with p99 under {1e3 / fps:.0f} ms "
                      f"({opts.phases[0]} phases): [bold]{result.max_streams_of(server)}[/]")
    if result.overhead is not None:
        console.print(f"serving overhead at 1 stream (server p50 / in-process p50): [bold]{result.overhead:.2f}x[/]")
    if json_out is not None:
        from gemx.fs import atomic_write

        data = {"urls": urls, "fps": fps, "seconds": seconds, "refs": refs, "size": size, "frames": result.frame_source,
                "max_streams": {s: result.max_streams_of(s) for s in result.servers}, "overhead": result.overhead,
                "rows": [asdict(r) for r in result.rows]}
        atomic_write(json_out, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"), overwrite=force)
        console.print(f"wrote {json_out}", markup=False, highlight=False)


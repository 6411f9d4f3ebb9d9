"""A real `tritonserver` (the nvidia-pytriton wheel's) on a repository of the tiny export, on free 127.0.0.1 ports.

No mocks: every request goes through gRPC streaming, Triton's sequence batcher and the Python backend, and
outputs are compared with local ONNX Runtime sessions over the same graphs.
"""

import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import InferenceServerClient, InferInput
from tritonclient.grpc.model_config_pb2 import ModelConfig
from typer.testing import CliRunner

from gemx import GemxError
from gemx.cli import app
from gemx.model.lr import downsample
from gemx.runtimes.registry import open_session, runtime_available
from gemx.serving.client import RemoteStream, executions
from gemx.serving.loadtest import LoadOptions, loadtest
from gemx.serving.repository import TritonOptions, read_repository, write_repository
from gemx.serving.server import TritonServer, free_port
from gemx.serving.streams import RESEND
from tests.conftest import frames, videos_or_skip
from tests.serving.launchers import Replica

IDLE_S = 3.0
MAX_REFS = 4


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory):
    kv_per_ref = read_export_dir_kv(tiny_export)
    # Room for two streams of two references, not three: the third evicts the least recently used.
    budget_mb = 5 * kv_per_ref / 2**20
    opts = TritonOptions(max_refs=MAX_REFS, kv_budget_mb=budget_mb, idle_timeout_s=IDLE_S, max_streams=32, threads=1)
    return write_repository(tiny_export.path, tmp_path_factory.mktemp("triton") / "repo", opts)


def read_export_dir_kv(export) -> int:
    with open_session("ort", export.path) as s:
        return s.kv_bytes(1)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    server = TritonServer(repo.path, grpc_port=free_port(), http_port=free_port(), log_path=log)
    server.start(timeout_s=90)
    yield server
    server.stop()
    assert server.process is None


@pytest.fixture(scope="module")
def local(tiny_export):
    return open_session("ort", tiny_export.path)


def data(seed: int, refs: int = 2):
    size, scale = 64, 4  # the tiny preset
    return frames(refs, size, seed=seed).numpy(), downsample(frames(3, size, seed=seed + 100), scale).numpy()[:, None]


def expected(local, refs, lr):
    return local.decode(lr, local.encode(refs))


class Raw:
    """A bare tritonclient stream, to send what gemx's own client never would."""

    def __init__(self, url):
        self.client = InferenceServerClient(url)
        self.responses = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, stream_id, lr=None, refs=None, start=False, end=False, dtype="FP32"):
        inputs = []
        for name, value in (("references", refs), ("target_lr", lr)):
            if value is not None:
                t = InferInput(name, list(value.shape), dtype)
                t.set_data_from_numpy(value)
                inputs.append(t)
        self.client.async_stream_infer("gemx", inputs, sequence_id=stream_id, sequence_start=start, sequence_end=end)
        result, error = self.responses.get(timeout=30)
        if error is not None:
            return str(error)
        return result

    def close(self):
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


@pytest.fixture
def raw(server):
    r = Raw(server.grpc_url)
    yield r
    r.close()


BATCH = 8


@pytest.fixture(scope="module")
def batched_server(tiny_export, tmp_path_factory):
    """`gemx triton --max-batch 8` with a 200 ms queue delay: streams that send at once form one execution (Triton waits
    up to the delay for a full batch of 8, then runs what it has)."""
    out = tmp_path_factory.mktemp("batched") / "repo"
    result = CliRunner().invoke(app, ["triton", str(tiny_export.path), "--out", str(out), "--max-refs", str(MAX_REFS),
                                      "--threads", "1", "--max-batch", str(BATCH), "--queue-delay-us", "200000"])
    assert result.exit_code == 0, result.output
    assert f"frames of up to {BATCH} streams per execution" in " ".join(result.output.split())
    server = TritonServer(out, grpc_port=free_port(), http_port=free_port(), log_path=out.parent / "tritonserver.log")
    server.start(timeout_s=90)
    yield server
    server.stop()


# -- the repository -----------------------------------------------------------------------------------
def test_config_parses_with_tritons_protobuf_and_follows_the_contract(repo, tiny_export):
    config = text_format.Parse((repo.model_dir / "config.pbtxt").read_text(), ModelConfig())
    contract = tiny_export_contract(tiny_export)
    inputs = {i.name: list(i.dims) for i in config.input}
    # the contract's symbolic axes (refs, height, width) are Triton's -1: one server takes every frame size; its batch
    # axis is one frame per request in a server that does not batch
    assert inputs == {"references": [-1, 3, -1, -1], "target_lr": [1, 3, -1, -1]}
    assert [d if isinstance(d, int) else -1 for d in contract.frame.inputs[0].shape] == [-1, *inputs["target_lr"][1:]]
    assert {i.name for i in config.input if i.optional} == {"references", "target_lr"}
    assert config.output[0].name == contract.frame.outputs[0].name
    assert list(config.output[0].dims) == [1, 3, -1, -1]
    assert config.sequence_batching.max_sequence_idle_microseconds == int(IDLE_S * 1e6)
    assert {c.name for c in config.sequence_batching.control_input} == {"START", "END", "CORRID"}
    assert config.parameters["max_refs"].string_value == str(MAX_REFS)
    assert read_repository(repo.path).manifest.export.sha256 == repo.manifest.export.sha256


def tiny_export_contract(tiny_export):
    from gemx.exporter.manifest import read_export_dir

    return read_export_dir(tiny_export.path).contract()


def test_triton_refuses_a_tampered_export_and_an_existing_repository(tiny_export, tmp_path, repo):
    tampered = tmp_path / "tampered.export"
    shutil.copytree(tiny_export.path, tampered)
    graph = tampered / "frame.onnx"
    data_ = bytearray(graph.read_bytes())
    data_[len(data_) // 2] ^= 0xFF
    graph.write_bytes(bytes(data_))
    res = CliRunner().invoke(app, ["triton", str(tampered), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "does not match the sha256" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(app, ["triton", str(tiny_export.path), "--out", str(repo.path)])
    assert res.exit_code == 1 and "--force" in res.output
    # The repository's own copy is verified too before a server loads it.
    copy = tmp_path / "repo"
    shutil.copytree(repo.path, copy)
    (copy / "gemx" / "1" / "export" / "frame.onnx").write_bytes(bytes(data_))
    with pytest.raises(GemxError, match="sha256"):
        read_repository(copy)


def test_serve_without_the_server_extra_says_what_to_install(repo):
    code = ("import sys; sys.modules['pytriton'] = None\n"
            "from gemx.cli import main; sys.argv = ['gemx', 'serve', sys.argv[1]]; main()")
    res = subprocess.run([sys.executable, "-c", code, str(repo.path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "pip install 'gemx[serve]'" in res.stderr and "Traceback" not in res.stderr


# -- streams on a real server ----------------------------------------------------------------------------
def test_two_interleaved_streams_match_two_local_sessions(server, local):
    (ra, la), (rb, lb) = data(1), data(2)
    with RemoteStream(server.grpc_url) as a, RemoteStream(server.grpc_url) as b:
        a.set_references(ra)
        b.set_references(rb)
        for i in range(3):
            np.testing.assert_allclose(a(la[i]), expected(local, ra, la[i]), atol=1e-4)
            np.testing.assert_allclose(b(lb[i]), expected(local, rb, lb[i]), atol=1e-4)
        assert a.encoder_runs == b.encoder_runs == 1  # references travelled once per stream
    assert np.abs(expected(local, ra, la[0]) - expected(local, rb, la[0])).max() > 1e-3  # the references matter


def test_references_replaced_mid_stream(server, local):
    (r1, lr), (r2, _) = data(3), data(4, refs=3)
    with RemoteStream(server.grpc_url) as s:
        s.set_references(r1)
        np.testing.assert_allclose(s(lr[0]), expected(local, r1, lr[0]), atol=1e-4)
        s.set_references(r2)
        np.testing.assert_allclose(s(lr[1]), expected(local, r2, lr[1]), atol=1e-4)
        assert s.encoder_runs == 2


def test_end_of_sequence_frees_the_cache(server, raw):
    refs, lr = data(5)
    before = int(raw.send(901, lr[0], refs, start=True).as_numpy("streams_open")[0])
    kv_open = int(raw.send(902, lr[0], refs, start=True).as_numpy("kv_cache_bytes")[0])
    assert before >= 1
    ended = raw.send(901, lr[1], end=True)
    assert int(ended.as_numpy("kv_cache_bytes")[0]) == kv_open - 2 * read_bytes_per_ref(server)
    assert int(ended.as_numpy("streams_open")[0]) == before  # 902 opened, 901 closed
    raw.send(902, None, end=True)


def read_bytes_per_ref(server):
    return read_repository(server.repo).manifest.kv_bytes_per_reference


def test_the_byte_budget_evicts_the_least_recently_used_stream(server, raw, local):
    streams = {sid: data(10 + sid) for sid in (1001, 1002, 1003)}
    for sid, (refs, lr) in streams.items():  # 3 x 2 references; the budget holds 2 x 2
        assert not isinstance(raw.send(sid, lr[0], refs, start=True), str)
    error = raw.send(1001, streams[1001][1][1])
    assert isinstance(error, str) and RESEND in error and "budget" in error
    for sid in (1002, 1003):  # the two most recent go on
        refs, lr = streams[sid]
        out = raw.send(sid, lr[1]).as_numpy("frame_hr")
        np.testing.assert_allclose(out, expected(local, refs, lr[1]), atol=1e-4)
    assert int(raw.send(1003, None, end=True).as_numpy("kv_cache_bytes")[0]) <= 5 * read_bytes_per_ref(server)
    raw.send(1002, None, end=True)


def test_the_idle_timeout_evicts_and_the_client_resends_references(server, local):
    refs, lr = data(20)
    with RemoteStream(server.grpc_url) as s, RemoteStream(server.grpc_url) as other:
        s.set_references(refs)
        other.set_references(refs)
        s(lr[0])
        other(lr[0])
        open_with_s = other.server_streams
        time.sleep(IDLE_S + 1.5)
        other(lr[1])  # the sweep and Triton's own idle timeout dropped both; `other` recovers first
        assert other.recoveries == 1
        np.testing.assert_allclose(s(lr[1]), expected(local, refs, lr[1]), atol=1e-4)
        assert s.recoveries == 1 and s.encoder_runs == 2
        assert other.server_streams <= open_with_s


def test_each_bad_input_gets_its_error_while_another_stream_goes_on(server, raw, local):
    good_refs, good_lr = data(30)
    assert not isinstance(raw.send(2000, good_lr[0], good_refs, start=True), str)
    refs, lr = data(31)
    cases = {
        "first frame without references": (dict(stream_id=2001, lr=lr[0], start=True), "must carry `references`"),
        "too many references": (dict(stream_id=2002, lr=lr[0], refs=frames(MAX_REFS + 1, 64).numpy(), start=True),
                                f"exceed the {MAX_REFS}"),
        "a frame not of its references' size": (dict(stream_id=2003, lr=lr[0][:, :, :8], refs=refs, start=True),
                                                 "target_lr is 16x8 but its references are 64x64"),
        "a size above the repository's limit": (dict(stream_id=2008, lr=np.zeros((1, 3, 16, 496), np.float32),
                                                     refs=np.zeros((1, 3, 64, 1984), np.float32), start=True),
                                                "exceed the largest size this export was validated at, 1920x1088"),
        "wrong dtype": (dict(stream_id=2004, lr=lr[0].astype(np.float64), refs=refs.astype(np.float64), start=True,
                             dtype="FP64"), "expects 'FP32'"),
        "NaN": (dict(stream_id=2005, lr=lr[0], refs=np.full_like(refs, np.nan), start=True), "NaN"),
        "0-255 pixels": (dict(stream_id=2006, lr=lr[0], refs=refs * 255, start=True), "divide 8-bit pixels by 255"),
        "frames of an unknown stream": (dict(stream_id=2007, lr=lr[0]), "START flag"),
    }
    for what, (request, message) in cases.items():
        error = raw.send(**request)
        assert isinstance(error, str) and message in error, what
        out = raw.send(2000, good_lr[1]).as_numpy("frame_hr")  # the other stream is untouched
        np.testing.assert_allclose(out, expected(local, good_refs, good_lr[1]), atol=1e-4, err_msg=what)
    raw.send(2000, None, end=True)


def test_streams_of_different_sizes_share_one_server(server, local):
    """A stream's size is its references': a 64x64 call and a 96x64 call (landscape) interleaved on one server, each
    frame equal to a local session of that size; references of another size mid-stream change the stream's size."""
    def call(h, w, seed):
        refs = torch.nn.functional.interpolate(frames(1, 64, seed=seed), size=(h, w), mode="bilinear").clamp(0, 1).numpy()
        lr = downsample(torch.from_numpy(refs[:1]).repeat(3, 1, 1, 1) * 0.9, 4).numpy()[:, None]
        return refs, lr

    calls = {"square": call(64, 64, 60), "landscape": call(64, 96, 61)}  # 96x64: this server's budget holds both
    streams = {name: RemoteStream(server.grpc_url) for name in calls}
    try:
        for name, (refs, _) in calls.items():
            streams[name].set_references(refs)
        for i in range(3):
            for name, (refs, lr) in calls.items():
                out = streams[name](lr[i])
                assert out.shape == (1, 3, *refs.shape[-2:])
                np.testing.assert_allclose(out, expected(local, refs, lr[i]), atol=1e-4, err_msg=name)
        refs, lr = calls["square"]
        streams["landscape"].set_references(refs)  # the call's camera changed: its stream now has the new size
        np.testing.assert_allclose(streams["landscape"](lr[0]), expected(local, refs, lr[0]), atol=1e-4)
        with pytest.raises(GemxError, match="target_lr is 24x16 but its references are 64x64"):
            streams["landscape"](calls["landscape"][1][0])
        assert streams["square"].server_kv_bytes > 0
    finally:
        for s in streams.values():
            s.close()


def test_a_server_restart_mid_stream_is_healed_by_the_client(server, local):
    refs, lr = data(40)
    with RemoteStream(server.grpc_url, reconnect_s=90) as s:
        s.set_references(refs)
        s(lr[0])
        server.stop()
        server.start(timeout_s=90)
        np.testing.assert_allclose(s(lr[1]), expected(local, refs, lr[1]), atol=1e-4)
        assert s.recoveries >= 1 and s.encoder_runs == 2


def test_loadtest_reports_rows_and_the_serving_overhead(server, repo):
    result = loadtest(server.grpc_url, LoadOptions([1, 2], fps=10, seconds=1.0, refs=2, repo=repo.path,
                                                   phases=["jittered", "aligned"]))
    modes = [(r.mode, r.phases, r.streams) for r in result.rows]
    assert modes == [("in-process", "", 1), ("server", "jittered", 1), ("server", "jittered", 2), ("server", "aligned", 1),
                     ("server", "aligned", 2)]
    for r in result.rows:
        assert r.errors == 0 and r.p50_ms > 0
    assert result.rows[2].server_kv_mb > 0
    assert result.overhead is not None and result.overhead > 0
    assert result.max_streams == max((r.streams for r in result.rows[1:3] if r.keeps_up), default=0)  # the headline: jittered


def test_calls_start_at_seeded_jittered_even_or_aligned_phases():
    from gemx.serving.loadtest import phase_offsets

    interval = 1 / 25
    jittered = phase_offsets(4, 25, "jittered", seed=3)
    assert jittered == phase_offsets(4, 25, "jittered", seed=3) != phase_offsets(4, 25, "jittered", seed=4)
    assert all(k / 4 * interval <= t < (k + 1) / 4 * interval for k, t in enumerate(jittered))  # one per slot, not on its edge
    assert jittered != phase_offsets(4, 25, "even") == pytest.approx([0, 0.01, 0.02, 0.03])
    assert phase_offsets(3, 25, "aligned") == [0, 0, 0]
    with pytest.raises(GemxError, match="--phases takes jittered, even, aligned"):
        LoadOptions([1], phases=["random"])


@pytest.mark.data
def test_stream_simulate_gives_the_frames_of_upscale(server, tiny_export, tmp_path):
    video = sorted(videos_or_skip().glob("*.mp4"))[0]
    ckpt = tiny_export.path.parent / "tiny.pt"
    runner = CliRunner()
    # the square protocol: this server's key/value budget holds streams at the tiny model's 64x64
    local = runner.invoke(app, ["upscale", str(video), str(tmp_path / "local"), "--simulate", "--refs", "3", "--ckpt", str(ckpt),
                                "--runtime", "ort", "--crop", "square"])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, ["stream", server.grpc_url, str(video), str(tmp_path / "remote"), "--simulate", "--refs", "3",
                                 "--crop", "square"])
    assert remote.exit_code == 0, remote.output
    from PIL import Image

    a, b = sorted((tmp_path / "local").glob("*.png")), sorted((tmp_path / "remote").glob("*.png"))
    assert len(a) == len(b) > 100
    for fa, fb in zip(a[::25], b[::25], strict=True):
        diff = np.abs(np.asarray(Image.open(fa), int) - np.asarray(Image.open(fb), int)).max()
        assert diff <= 1, (fa.name, diff)
    psnr = [line for line in remote.output.splitlines() if "PSNR" in line]
    assert psnr and psnr == [line for line in local.output.splitlines() if "PSNR" in line]


def test_triton_force_replaces_only_its_own_repository(tiny_export, tmp_path):
    out = tmp_path / "r"
    first = write_repository(tiny_export.path, out, TritonOptions(max_streams=2))
    again = write_repository(tiny_export.path, out, TritonOptions(max_streams=3, force=True))
    assert first.manifest.limits.max_streams == 2 and read_repository(out).manifest.limits.max_streams == 3
    assert again.path == out
    other = tmp_path / "site"
    other.mkdir()
    (other / "index.html").write_text("<html>")
    with pytest.raises(GemxError, match="not a gemx Triton repository"):
        write_repository(tiny_export.path, other, TritonOptions(force=True))
    assert [p.name for p in other.iterdir()] == ["index.html"]


def test_serve_on_a_busy_port_is_one_line(repo):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", str(repo.path), "--http-port", str(port), "--grpc-port", str(free_port()),
                                       "--metrics-port", str(free_port())])
    assert res.exit_code == 1 and f"port {port} on 127.0.0.1 is in use" in res.output and "Traceback" not in res.output


@pytest.mark.server
def test_gemx_serve_runs_until_sigterm_and_leaves_no_server(repo):
    import os
    import signal

    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "gemx", "serve", str(repo.path), "--grpc-port", ports[0], "--http-port", ports[1],
                             "--metrics-port", ports[2]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        line = proc.stdout.readline()  # printed once the model is ready
        assert f"127.0.0.1:{ports[0]}" in line, line + proc.stderr.read()
        with RemoteStream(f"127.0.0.1:{ports[0]}") as s:
            refs, lr = data(50)
            s.set_references(refs)
            assert s(lr[0]).shape == (1, 3, 64, 64)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "stopping" in out and "error" not in err, err
    children = subprocess.run(["pgrep", "-f", f"--grpc-port={ports[0]}"], capture_output=True, text=True).stdout.split()
    assert children == []  # the tritonserver it started is gone too


@pytest.mark.server
def test_a_launcher_killed_by_sigkill_takes_its_server_with_it(repo):
    """A supervisor or the OOM killer sends SIGKILL, which `gemx serve` cannot handle: its tritonserver (in a process
    group of its own) must still go, and free its ports, or a dead replica keeps serving."""
    from gemx.serving.server import port_free

    replica = Replica(repo.path)
    try:
        assert f"127.0.0.1:{replica.grpc}" in replica.ready_line
        assert len(replica.children) == 1 and "tritonserver" in Path(f"/proc/{replica.children[0]}/cmdline").read_text()
        replica.kill()  # and waits, bounded, until the tritonserver has gone too
        deadline = time.monotonic() + 30
        while not all(port_free("127.0.0.1", port) for port in replica.ports) and time.monotonic() < deadline:
            time.sleep(0.2)  # the Python backend's stub, orphaned, notices its server is gone and lets go
        assert all(port_free("127.0.0.1", port) for port in replica.ports)
    finally:
        replica.stop()


@pytest.mark.parametrize("args, message", [
    (["--max-streams", "0"], "--max-streams must be a positive integer"),
    (["--kv-budget-mb", "-1"], "--kv-budget-mb must be positive"),
    (["--max-refs", "99"], "--max-refs must be between 1 and the export's 12"),
    (["--runtime", "onnx"], "unknown serving runtime 'onnx'"),
    (["--precision", "fp16"], "the ort runtime does not run fp16; fp16 runs on torch-cuda, ort-cuda, ort-tensorrt, tensorrt"),
    (["--precision", "int8"], "has no int8 graphs; re-export with `gemx export --int8`"),
])
def test_bad_triton_options_are_one_line(tiny_export, tmp_path, args, message):
    res = CliRunner().invoke(app, ["triton", str(tiny_export.path), "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.data
@pytest.mark.server
def test_an_int8_repository_serves_the_int8_graphs(int8_export, tmp_path):
    """`gemx triton --precision int8`: the server runs the export's INT8 graphs (ORT CPU, prepared; then OpenVINO, as
    they are), frame for frame what a local INT8 session of the same runtime gives, and visibly not the FP32 frame.
    The model's deepest level has 64 channels, so the stream's cache mixes float32 and int8 keys."""
    from gemx.exporter.manifest import read_export_dir
    from gemx.exporter.validate import INT8_PSNR_GOAL
    from gemx.metrics import psnr_db

    path = int8_export[1].path
    keys = [s.dtype for s in read_export_dir(path).contract("int8").keys]
    assert keys == ["float32", "float32", "int8"]
    refs, lr = data(7)
    with open_session("ort", path) as fp32:
        fp32_frames = [fp32.decode(x, fp32.encode(refs)) for x in lr]
    # `gemx triton --precision int8`, then `--runtime openvino`: the same QDQ graphs in OpenVINO's int8 kernels
    for runtime in ("ort", "openvino") if runtime_available("openvino")[0] else ("ort",):
        repo = write_repository(path, tmp_path / runtime, TritonOptions(runtime=runtime, precision="int8", max_refs=MAX_REFS,
                                                                        threads=1))
        assert repo.manifest.precision == "int8"
        with open_session(runtime, path, "int8", threads=1) as int8:
            want = [int8.decode(x, int8.encode(refs)) for x in lr]
        server = TritonServer(repo.path, grpc_port=free_port(), http_port=free_port(), log_path=tmp_path / f"{runtime}.log")
        server.start(timeout_s=90)
        try:
            with RemoteStream(server.grpc_url) as stream:
                stream.set_references(refs)
                for x, w, f in zip(lr, want, fp32_frames, strict=True):
                    got = stream(x)
                    np.testing.assert_allclose(got, w, atol=1e-5)
                    assert INT8_PSNR_GOAL < psnr_db(got, f) < 100
        finally:
            server.stop()


# -- frames of several streams per execution ---------------------------------------------------------
def test_a_batching_config_gives_triton_the_batch_axis(batched_server):
    config = text_format.Parse((batched_server.repo / "gemx" / "config.pbtxt").read_text(), ModelConfig())
    assert config.max_batch_size == BATCH
    assert list(config.sequence_batching.oldest.preferred_batch_size) == [BATCH]
    assert config.sequence_batching.oldest.max_queue_delay_microseconds == 200000
    inputs = {i.name: i for i in config.input}
    assert list(inputs["target_lr"].dims) == [3, -1, -1] and list(inputs["references"].dims) == [-1, 3, -1, -1]
    assert inputs["target_lr"].allow_ragged_batch and inputs["references"].allow_ragged_batch  # sizes mix in one execute
    assert list(config.output[0].dims) == [3, -1, -1]


def test_interleaved_streams_batched_by_the_server_equal_local_sessions(batched_server, local):
    """Four calls send each frame at the same moment: Triton hands the model their requests together, the model
    runs the two 64x64 calls of 2 references as one batch and the others (3 references; 64x96) on their own,
    and every frame equals a local session's. A bad request sent at the same moment fails alone."""
    def call(h, w, refs, seed):
        at = torch.nn.functional.interpolate(frames(refs + 3, 64, seed=seed), size=(h, w), mode="bilinear").clamp(0, 1)
        return at[:refs].numpy(), downsample(at[refs:], 4).numpy()[:, None]

    calls = [call(64, 64, 2, 70), call(64, 64, 2, 71), call(64, 64, 3, 72), call(64, 96, 2, 73)]
    streams = [RemoteStream(batched_server.grpc_url) for _ in calls]
    bad = Raw(batched_server.grpc_url)
    got = [[None] * 3 for _ in calls]
    errors = []
    together = threading.Barrier(len(calls) + 1)
    before = executions(batched_server.grpc_url)

    def run(k):
        refs, lr = calls[k]
        streams[k].set_references(refs)
        for i in range(3):
            together.wait(timeout=60)
            got[k][i] = streams[k](lr[i])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    try:
        for t in threads:
            t.start()
        for i in range(3):
            together.wait(timeout=60)
            if i == 1:  # a frame not of its references' size, beside the others
                errors.append(bad.send(5000, calls[0][1][0][..., :8], calls[0][0][None], start=True))
        for t in threads:
            t.join(timeout=60)
        runs, requests = np.subtract(executions(batched_server.grpc_url), before)
    finally:
        bad.close()
        for s in streams:
            s.close()
    for (refs, lr), frames_out in zip(calls, got, strict=True):
        for x, out in zip(lr, frames_out, strict=True):
            assert out.shape == (1, 3, *refs.shape[-2:])
            np.testing.assert_allclose(out, expected(local, refs, x), atol=1e-4)
    assert isinstance(errors[0], str) and "target_lr is 8x16 but its references are 64x64" in errors[0]
    assert requests >= 12 and runs < requests  # Triton formed batches of several streams' requests


def test_loadtest_compares_an_unbatched_and_a_batched_server(server, batched_server, tmp_path):
    out = tmp_path / "load.json"
    result = CliRunner().invoke(app, ["loadtest", server.grpc_url, batched_server.grpc_url, "--streams", "2", "--fps", "10",
                                      "--seconds", "1", "--refs", "2", "--phases", "aligned", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["server"] for r in rows] == [f"{server.grpc_url} (unbatched)", f"{batched_server.grpc_url} (batch <= {BATCH})"]
    assert rows[0]["mean_batch"] == 1.0  # one request per execution, whatever arrives together
    assert all(r["executions_per_s"] > 0 and r["mean_batch"] >= 1 for r in rows)
    assert "mean batch" in result.output and f"{batched_server.grpc_url} (batch <= {BATCH})" in " ".join(result.output.split())

"""Scale-out for real: two `gemx serve` replicas of one repository behind `gemx balance` (nginx), on free 127.0.0.1
ports, every process started here and stopped by its own process id.

Which replica holds a stream is read from the replicas' own Triton metrics (successful requests of the gemx
model), a stream at a time; frames are compared with local ONNX Runtime sessions over the same graphs.
"""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gemx import GemxError
from gemx.model.lr import downsample
from gemx.runtimes.registry import open_session
from gemx.serving.balancer import BalancerOptions, find_nginx, nginx_config
from gemx.serving.client import RemoteStream
from gemx.serving.repository import TritonOptions, write_repository
from gemx.serving.server import free_port
from tests.conftest import frames
from tests.serving.launchers import ENV, Process, Replica

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def nginx_or_skip() -> None:
    try:
        find_nginx()
    except GemxError as e:
        if os.environ.get("CI") == "true":  # .ci/run installs it: a CI without it must fail, not skip
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory):
    return write_repository(tiny_export.path, tmp_path_factory.mktemp("scaleout") / "repo",
                            TritonOptions(max_refs=4, max_streams=8, threads=1)).path


@pytest.fixture
def cluster(repo):
    """Two replicas and a balancer in front of them, each stopped by its own pid whatever the test did."""
    nginx_or_skip()
    started = []
    try:
        replicas = [Replica(repo) for _ in range(2)]
        started += replicas
        port = free_port()
        # a timeout above the seconds a killed replica takes to go: the survivors' streams must not go silent past it
        balancer = Process("balance", *(r.url for r in replicas), "--grpc-port", str(port), "--timeout", "60")
        started.append(balancer)
        yield replicas, balancer, f"127.0.0.1:{port}"
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture(scope="module")
def local(tiny_export):
    with open_session("ort", tiny_export.path) as s:
        yield s


def call(seed: int):
    """A call's references and LR frames."""
    hr = frames(8, 64, seed=seed).numpy()
    return hr[:2], downsample(__import__("torch").from_numpy(hr[2:]), 4).numpy()[:, None]


def expected(local, refs, lr):
    local.set_references(refs)
    return local(lr)


def where(stream: RemoteStream, replicas: list[Replica], lr) -> int:
    """Send one frame and return the index of the replica that answered it."""
    before = [r.requests() for r in replicas]
    stream(lr)
    grew = [i for i, r in enumerate(replicas) if r.requests() > before[i]]
    assert len(grew) == 1, (before, [r.requests() for r in replicas])
    return grew[0]


def test_streams_pinned_through_the_balancer_survive_losing_a_replica(cluster, local):
    """Four interleaved calls through nginx: frame-exact to local sessions, spread over both replicas; SIGKILL to
    one replica's `gemx serve` takes its tritonserver down, its calls recover exactly once (one re-send of
    references, through the balancer, to the survivor) and go on to their last frame, the survivor's calls see
    nothing. Bad input still fails fast; a stopped balancer is a clear error, not a hang."""
    replicas, balancer, url = cluster
    calls = [call(seed) for seed in range(4)]
    streams = [RemoteStream(url, reconnect_s=5) for _ in calls]
    try:
        home = []
        for s, (refs, lr) in zip(streams, calls, strict=True):
            s.set_references(refs)
            home.append(where(s, replicas, lr[0]))
        assert sorted(home) == [0, 0, 1, 1], home  # least_conn: two calls on each replica
        for i in range(1, 6):  # interleaved, frames 1..5 of every call; the replica dies after frame 2
            if i == 3:
                replicas[0].kill()
            for s, (refs, lr) in zip(streams, calls, strict=True):
                np.testing.assert_allclose(s(lr[i]), expected(local, refs, lr[i]), atol=1e-4)
        assert [s.recoveries for s in streams] == [1 if h == 0 else 0 for h in home]
        assert [s.encoder_runs for s in streams] == [2 if h == 0 else 1 for h in home]

        recovered = [s.recoveries for s in streams]
        with pytest.raises(GemxError, match="target_lr"):  # the model's refusal, not a lost connection
            streams[0](np.zeros((1, 3, 17, 17), np.float32))
        with pytest.raises(GemxError, match="references exceed the 4 this server allows"):
            streams[1].set_references(frames(5, 64).numpy())
        assert [s.recoveries for s in streams] == recovered

        balancer.stop()
        started = time.monotonic()
        with pytest.raises(GemxError, match=f"cannot reach a gemx server at {url}"):
            streams[1](calls[1][1][0])
        assert time.monotonic() - started < 30
    finally:
        for s in streams:
            with contextlib.suppress(GemxError):
                s.close()


def test_gemx_stream_through_the_balancer_writes_every_frame_when_its_replica_dies(cluster, tmp_path):
    from gemx.video.io import write_video

    replicas, _, url = cluster
    clip = (frames(24, 64, seed=7).numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    n = 600
    write_video(tmp_path / "call.mp4", (clip[i % len(clip)] for i in range(n)), fps=25)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gemx", "stream", url, str(tmp_path / "call.mp4"), str(out), "--simulate",
                             "--refs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # until a tenth of the frames are written
            written = [len(list(d.glob("*.png"))) for d in tmp_path.glob(".out.gemx-*.tmp")]
            if written and written[0] >= n // 10:
                break
            time.sleep(0.02)
        counts = [r.requests() for r in replicas]
        time.sleep(0.3)
        serving = [i for i, r in enumerate(replicas) if r.requests() > counts[i]]
        assert len(serving) == 1, "the stream ended before a replica could be killed under it"
        replicas[serving[0]].kill()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "recovered 1x" in stdout and f"{n} frames" in stdout, stdout
    assert len(list(out.glob("*.png"))) == n


def test_nginx_missing_is_one_line(monkeypatch):
    import gemx.serving.balancer as balancer

    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(balancer, "SBIN", ())
    with pytest.raises(GemxError, match=r"runs nginx, which is not installed; install it with `apt-get install nginx-light`"):
        balancer.Balancer(BalancerOptions(("127.0.0.1:1",))).start()


def test_the_kubernetes_files_parse_and_keep_the_balancers_cap_and_timeouts():
    """No cluster runs here: the manifests are parsed, and checked against the nginx config `gemx balance` writes."""
    docs = [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "Ingress"} <= set(kinds)
    opts = BalancerOptions(("replica:8001",))
    conf = nginx_config(opts)
    notes = kinds["Ingress"]["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert f"{notes[f'nginx.ingress.kubernetes.io/{key}']}s" == f"{opts.timeout_s}s"
    assert f"grpc_read_timeout {opts.timeout_s}s" in conf
    container = kinds["Deployment"]["spec"]["template"]["spec"]
    init = " ".join(container["initContainers"][0]["args"])
    assert f"--max-streams {opts.max_streams}" in init and f"max_conns={opts.max_streams}" in conf
    ports = {p["containerPort"] for c in container["containers"] for p in c["ports"]}
    assert 8001 in ports and kinds["Service"]["spec"]["ports"][0]["targetPort"] == 8001

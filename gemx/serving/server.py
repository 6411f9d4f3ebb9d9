"""Run Triton Inference Server locally on a model repository, from the binary the `nvidia-pytriton` wheel bundles.

The wheel carries a CPU-only `tritonserver` with the Python backend, its shared libraries and a Python
backend stub per Python version; gemx runs the binary directly (PyTriton's own API is not needed). The
stub embeds Python and computes with the environment whose `bin/` comes first on PATH: gemx gives it
this interpreter's environment, on purpose, after checking that its numpy is one the stub handles.
On a GPU server, run the official Triton container on the same repository instead (see the README).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gemx.errors import GemxError
from gemx.serving.repository import MODEL_NAME, read_repository
from gemx.serving.stub_env import SERVE_EXTRA, check_stub_numpy


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    libs: Path  # the wheel's bundled shared libraries
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python


def find_triton() -> TritonInstall:
    """The `tritonserver` of the installed nvidia-pytriton wheel, or one line saying what to install."""
    try:
        import pytriton
    except ImportError:
        raise GemxError(f"Triton Inference Server is not installed; install it with: {SERVE_EXTRA}") from None
    root = Path(pytriton.__file__).parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonInstall(root / "tritonserver" / "bin" / "tritonserver", root.parent / "nvidia_pytriton.libs",
                          root / "tritonserver" / "backends" / "python",
                          root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub")
    for what, path in (("server binary", found.binary), ("libraries", found.libs), ("Python backend", found.python_backend),
                       (f"Python {version} backend stub", found.stub)):
        if not path.exists():
            raise GemxError(f"the nvidia-pytriton wheel has no {what} ({path}); reinstall it with: {SERVE_EXTRA}")
    return found


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now: another listener makes it busy, a connection of a
    server that just stopped (TIME_WAIT) does not, as for the server itself (SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(process: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM to a server gemx started, by its own process id; SIGKILL if it is still there after `timeout_s`."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def dies_with(parent: int | None = None):
    """For Popen's preexec_fn (in the child, before exec): the kernel sends the child SIGKILL when the launcher dies
    however it dies. A launcher that could stop its server stops it gracefully (`TritonServer.stop`); one that was
    killed is a crash, and its server must go at once: Triton's graceful exit waits for its open gRPC streams,
    which a balancer keeps open, so SIGTERM would leave a dead replica serving. Linux's parent-death signal follows
    the launching thread, so a server is started from a thread that outlives it (the main thread, in gemx)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before the signal was armed
            os._exit(1)

    return preexec


class TritonServer:
    """A `tritonserver` process on 127.0.0.1 serving one repository; a context manager that always stops it.

        with TritonServer(repo, grpc_port=8001) as server:
            print(server.grpc_url)
    """

    def __init__(self, repo: Path, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int | None = None,
                 log_path: Path | None = None, host: str = "127.0.0.1"):
        self.repo = Path(repo).resolve()
        self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        read_repository(self.repo)  # verified before the server loads anything from it
        install = find_triton()
        for option, port in (("--grpc-port", self.grpc_port), ("--http-port", self.http_port), ("--metrics-port", self.metrics_port)):
            if not port_free(self.host, port):
                raise GemxError(f"port {port} on {self.host} is in use; choose another {option}")
        check_stub_numpy()
        self._workdir = Path(tempfile.mkdtemp(prefix="gemx-triton-"))
        backend = self._workdir / "backends" / "python"
        backend.mkdir(parents=True)
        for f in (install.python_backend / "libtriton_python.so", install.python_backend / "triton_python_backend_utils.py"):
            shutil.copy(f, backend / f.name)
        shutil.copy(install.stub, backend / "triton_python_backend_stub")
        log_path = self.log_path or self._workdir / "tritonserver.log"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (sysconfig.get_config_var("LIBDIR"), str(install.libs),
                                                              env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        cmd = [str(install.binary), f"--model-repository={self.repo}", f"--backend-directory={backend.parent}",
               f"--grpc-address={self.host}", f"--http-address={self.host}", f"--metrics-address={self.host}",
               f"--grpc-port={self.grpc_port}", f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
               "--allow-sagemaker=false", "--allow-vertex-ai=false", "--log-verbose=0", "--exit-timeout-secs=3"]
        with open(log_path, "wb") as log:
            # Its own process group: Ctrl-C in the terminal reaches gemx, which then stops the server itself. And it
            # dies with gemx: a launcher killed by SIGKILL (a supervisor, the OOM killer) cannot stop it itself.
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=dies_with())
        self._log_path = log_path
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"{self.http_url}/v2/models/{MODEL_NAME}/ready"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                tail = self.log_tail()
                self.stop()
                raise GemxError(f"tritonserver exited with code {code} before the model was ready: {tail}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise GemxError(f"the gemx model was not ready within {timeout_s:.0f} s: {tail}")

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self._log_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            return "(no server log)"
        useful = [t for t in text if "NVML" not in t and "DCGM" not in t] or text
        return " | ".join(useful[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the server's own process id (Triton drains and exits), SIGKILL if it does not."""
        process, self.process = self.process, None
        terminate(process, timeout_s)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

"""`gemx serve` and `gemx balance` run as a user runs them, in processes of their own that the tests start, wait for
(each prints one line once it is ready) and stop by their own process ids, with whatever they started."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gemx.serving.server import free_port

ENV = {**os.environ, "COLUMNS": "200"}


def running(pid: int) -> bool:
    """Whether a process exists and has not exited (an exited one waits as a zombie until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Process:
    """A gemx command that serves until stopped: started, waited for until it says it is ready, stopped by pid."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "gemx", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV)
        self.ready_line = self.proc.stdout.readline()
        if self.proc.poll() is not None or not self.ready_line:
            raise AssertionError(f"gemx {args[0]} did not start: {self.ready_line}{self.proc.stderr.read()}")
        self.children = [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]

    def kill(self) -> None:
        """SIGKILL, as a supervisor or the OOM killer would; waits until what it started has gone too."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 30
        while any(running(c) for c in self.children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(c) for c in self.children), "a server outlived its killed launcher"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        for child in self.children:  # started by this test, through gemx: never left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


class Replica(Process):
    """`gemx serve REPO` on free loopback ports."""

    def __init__(self, repo: Path):
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        super().__init__("serve", str(repo), "--grpc-port", str(self.grpc), "--http-port", str(self.http),
                         "--metrics-port", str(self.metrics))
        self.url = f"127.0.0.1:{self.grpc}"

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.grpc, self.http, self.metrics

    def requests(self) -> int:
        """Successful requests of the gemx model, from the replica's Prometheus metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        found = re.search(r'^nv_inference_request_success\{model="gemx",version="1"\} (\d+)', text, re.M)
        return int(found.group(1)) if found else 0

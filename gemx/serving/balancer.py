"""A gRPC load balancer in front of gemx Triton replicas: nginx, configured and run by gemx.

A stream's key/value cache lives in the replica that encoded it. A gRPC bidirectional stream is one HTTP/2
request, and nginx's `grpc_pass` keeps a request on one upstream for its whole life, so each call is pinned to
its replica by construction (Triton's own advice: a compliant load balancer plus the streaming API). New calls
go to the replica with the fewest open streams (`least_conn`), at most `max_streams` per replica (Triton's
sequence batcher admits every sequence it is sent, so the cap belongs here). A replica that dies resets its
calls' streams; their clients reconnect to the balancer, which sends them to a live replica, and re-send their
references once (`gemx.serving.client`). The config is written to be read and copied into a user's own nginx
or ingress (see `deploy/kubernetes/`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gemx.errors import GemxError, check_positive
from gemx.serving.server import dies_with, port_free, terminate

INSTALL_NGINX = "install it with `apt-get install nginx-light` (Debian, Ubuntu) or your system's nginx package"


@dataclass(frozen=True)
class BalancerOptions:
    """replicas: gRPC addresses (host:port) of `gemx serve` replicas of one repository.
    max_streams: streams one replica takes at once (size it with `gemx loadtest`); while every replica is full,
        nginx answers new calls at once with HTTP 502 (gRPC UNAVAILABLE) instead of queueing them on a busy replica.
    timeout_s: how long a stream may go without a byte either way before nginx resets it (a dead host that never
        closes its sockets is noticed within this), and how long a failed replica is left out of new calls."""

    replicas: tuple[str, ...]
    grpc_port: int = 8001
    host: str = "127.0.0.1"
    max_streams: int = 16
    timeout_s: int = 5

    def __post_init__(self) -> None:
        if not self.replicas:
            raise GemxError("name at least one replica: gemx balance HOST:PORT [HOST:PORT ...]")
        for replica in self.replicas:
            host, _, port = replica.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise GemxError(f"replica {replica!r} is not HOST:PORT (the gRPC address of a `gemx serve`)")
        check_positive(grpc_port=self.grpc_port, max_streams=self.max_streams, timeout=self.timeout_s)


def nginx_config(opts: BalancerOptions, prefix: Path | str = "/var/lib/gemx-balance") -> str:
    """The nginx configuration of a balancer: every file nginx writes lives under `prefix`."""
    servers = "\n".join(f"        server {r} max_conns={opts.max_streams} max_fails=1 fail_timeout={opts.timeout_s}s;"
                        for r in opts.replicas)
    t = f"{opts.timeout_s}s"
    return f"""\
# gemx balance: gRPC streams of gemx calls over {len(opts.replicas)} Triton replica(s).
# Each call is one gRPC stream, kept on one replica for its whole life; a replica's streams are capped
# (max_conns); a replica that fails is left out of new calls for {t}; a stream silent for {t} is reset,
# and its client reconnects and re-sends its references.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream gemx_replicas {{
        least_conn;
{servers}
    }}

    server {{
        listen {opts.host}:{opts.grpc_port} http2;
        client_max_body_size 0;
        client_body_timeout {t};

        location / {{
            grpc_pass grpc://gemx_replicas;
            grpc_connect_timeout 2s;
            grpc_read_timeout {t};
            grpc_send_timeout {t};
        }}
    }}
}}
"""


SBIN = ("/usr/sbin", "/usr/local/sbin")  # where packages put nginx, often outside a user's PATH


def find_nginx() -> Path:
    found = shutil.which("nginx", path=os.pathsep.join((os.environ.get("PATH", ""), *SBIN)))
    if found is None:
        raise GemxError(f"gemx balance runs nginx, which is not installed; {INSTALL_NGINX}")
    return Path(found)


class Balancer:
    """nginx in the foreground on one config; a context manager that always stops it.

        with Balancer(BalancerOptions(("127.0.0.1:8101", "127.0.0.1:8201"), grpc_port=8001)) as lb:
            print(lb.grpc_url)
    """

    def __init__(self, opts: BalancerOptions):
        self.opts = opts
        self.process: subprocess.Popen | None = None
        self._prefix: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.opts.host}:{self.opts.grpc_port}"

    def start(self, timeout_s: float = 15.0) -> Balancer:
        nginx = find_nginx()
        if not port_free(self.opts.host, self.opts.grpc_port):
            raise GemxError(f"port {self.opts.grpc_port} on {self.opts.host} is in use; choose another --grpc-port")
        self._prefix = Path(tempfile.mkdtemp(prefix="gemx-balance-"))
        self._prefix.chmod(0o755)  # run as root, nginx's workers are another user: they must reach their temp folders
        conf = self._prefix / "nginx.conf"
        conf.write_text(nginx_config(self.opts, self._prefix))
        cmd = [str(nginx), "-p", str(self._prefix), "-c", str(conf), "-e", str(self._prefix / "error.log"), "-g", "daemon off;"]
        check = subprocess.run([*cmd[:-2], "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            why = (check.stderr.strip().splitlines() or ["?"])[-1]
            self.stop()
            raise GemxError(f"nginx refused the balancer's config: {why}")
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=dies_with())
        deadline = time.monotonic() + timeout_s
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                why = self.error_tail()
                self.stop()
                raise GemxError(f"nginx did not start listening on {self.grpc_url}: {why}")
            time.sleep(0.05)
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((self.opts.host, self.opts.grpc_port)) == 0

    def error_tail(self, lines: int = 3) -> str:
        try:
            text = (self._prefix / "error.log").read_text(errors="replace").strip().splitlines()
        except (OSError, TypeError):
            text = []
        return " | ".join(text[-lines:]) or "(no nginx error log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to nginx's own process id, its fast shutdown: open streams are reset (their clients reconnect
        elsewhere or say they cannot), where SIGQUIT would keep serving them as long as they last. SIGKILL if it lingers."""
        process, self.process = self.process, None
        terminate(process, timeout_s)
        if self._prefix is not None:
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None

    def __enter__(self) -> Balancer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

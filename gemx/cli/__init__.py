"""The `gemx` command line: parse, call one library function, render with rich.

One module per command group, each thin; every command's work is a library function. A `GemxError`
becomes one red line (printed literally) and exit code 1.
"""

import signal

from gemx.cli import models, profile, serve, training, video  # noqa: F401  (registers the commands)
from gemx.cli._app import app
from gemx.fs import request_stop


def _stop(signum, frame) -> None:
    request_stop()
    raise KeyboardInterrupt


def main() -> None:
    stops = (signal.SIGINT, signal.SIGTERM)
    for sig in stops:  # SIGTERM cleans up like Ctrl-C
        signal.signal(sig, _stop)
    try:
        app(prog_name="gemx")
    finally:  # the command has ended, its files are whole: a stop while the interpreter exits changes nothing
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)

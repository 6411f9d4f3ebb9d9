"""The `gemx` command line: parse, call one library function, render with rich.

One module per command group, each thin; every command's work is a library function. A `GemxError`
becomes one red line (printed literally) and exit code 1.
"""

import signal
import sys

from gemx.cli import models, profile, serve, training, video  # noqa: F401  (registers the commands)
from gemx.cli._app import app, command_running, fail
from gemx.fs import request_stop, stop_requested

STOPS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum, frame) -> None:
    """Ctrl-C and SIGTERM stop the running command like Ctrl-C: its atomic writes clean up, it exits 130.

    Only the first stop raises, and only while a command runs: outside one (parsing, or after the command
    returned, its files whole) nothing is being written, so a stop there must not become a KeyboardInterrupt
    that escapes to the interpreter, which would then kill itself by SIGINT's default action (exit -2)."""
    first = not stop_requested()
    request_stop()
    if first and command_running():
        raise KeyboardInterrupt


def main() -> None:
    for sig in STOPS:
        signal.signal(sig, _stop)
    try:
        app(prog_name="gemx")
    except KeyboardInterrupt:  # last resort: a stop raised in the instant a command was ending
        fail("interrupted; nothing half-written was left behind", 130)
        sys.exit(130)
    finally:  # the command has ended, its files are whole: a stop while the interpreter exits changes nothing
        for sig in STOPS:
            signal.signal(sig, signal.SIG_IGN)
        if stop_requested():
            _forget_caught_interrupt()


def _forget_caught_interrupt() -> None:
    """Let a stopped command exit 130, as it said.

    CPython marks a KeyboardInterrupt raised inside code that exec() runs from a string as unhandled even when it
    is caught (dataclasses and namedtuple build their methods so, and torch defines many at import), and then ends
    the interpreter by SIGINT (exit -2) instead of by its exit code. Running a string clears the mark (Python/
    pythonrun.c, run_eval_code_obj)."""
    exec("")


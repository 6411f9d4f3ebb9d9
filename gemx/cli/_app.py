"""The Typer app, the console, and what every command shares: GemxErrors as one literal line, option checks."""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from gemx.errors import GemxError
from gemx.fs import os_error, stop_requested

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
if not console.is_terminal:  # piped or captured: wide enough for the profile table
    console = Console(width=160)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """gemx: deploy multi-reference talking-head super-resolution (export, build, profile, upscale, serve)."""


def lit(value: object) -> str:
    """A user's value (a path, a file name) inside rich markup, shown literally: `run[final].pt` stays whole."""
    return escape(str(value))


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print("[bold red]error:[/] ", end="", highlight=False)
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)  # literal: paths may hold [brackets]
    return typer.Exit(code)


def command(fn):
    """Register a CLI command whose user-caused failures are one line and a non-zero exit, not a traceback.

    GemxErrors say what was wrong; the operating system's refusals (read-only folder, full disk) name the
    path and the reason; Ctrl-C and SIGTERM stop the command after its atomic writes have cleaned up.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _running["command"] = True
        try:
            try:
                result = fn(*args, **kwargs)
            finally:
                _running["command"] = False  # from here a stop signal only records itself (see gemx.cli._stop)
            if stop_requested():  # the signal's KeyboardInterrupt was lost in a finalizer; no commit happened after it
                raise KeyboardInterrupt
            return result
        except GemxError as e:
            raise fail(str(e)) from None
        except OSError as e:
            path = e.filename if e.filename is not None else "a file"
            raise fail(str(os_error(e, path, "access"))) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing half-written was left behind", 130) from None

    return app.command()(wrapper)


_running = {"command": False}


def command_running() -> bool:
    """Whether a command's own work is under way (a stop signal then interrupts it; outside, it only stops it)."""
    return _running["command"]


def _load_model(ckpt: Path | None, preset_name: str | None):
    from gemx.model import build_model, load_checkpoint, preset

    if ckpt is not None and preset_name is not None:
        raise GemxError("pass either a checkpoint or --preset, not both")
    if preset_name is not None:
        return build_model(preset(preset_name)).eval(), f"preset {preset_name} (untrained)"
    loaded = load_checkpoint(ckpt)
    return loaded.model, str(loaded.path)


def _si(n: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".strip()


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GemxError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise GemxError(f"{what} must be positive integers, got {text!r}")
    return values


def _size(text: str, what: str) -> tuple[int, int]:
    """'1280x720' (width x height, as video tools say it) or '256' (a square) -> (height, width)."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise GemxError(f"{what} must be WIDTHxHEIGHT in pixels (e.g. 1280x720) or one side for a square, got {text!r}") from None
    if len(parts) > 2 or min(w, h) < 1:
        raise GemxError(f"{what} must be WIDTHxHEIGHT in pixels (e.g. 1280x720) or one side for a square, got {text!r}")
    return h, w


def check_outputs(paths: list[Path | None], force: bool) -> None:
    """Refuse, before any work, output files that exist (without --force) or cannot be files."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise GemxError(f"cannot write {path}: it is a directory")
        if path.exists() and not force:
            raise GemxError(f"{path} already exists; pass --force to replace it or choose another file")

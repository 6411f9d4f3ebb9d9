"""The `gemx` command line: parse, call one library function, render with rich.

Every command's work is a library function; this module only turns arguments into calls and
results into tables. A `GemxError` becomes one red line and exit code 1.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemx.errors import GemxError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="gemx: deploy multi-reference talking-head super-resolution (export, build, profile, upscale).")
console = Console()


@app.callback()
def _root() -> None:
    """gemx: deploy multi-reference talking-head super-resolution (export, build, profile, upscale)."""

err_console = Console(stderr=True)


def command(fn):
    """Register a CLI command whose GemxErrors are reported as one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GemxError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return app.command()(wrapper)


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
    table = Table(title=f"gemx model: {source}", show_header=False)
    for k, v in d["config"].items():
        table.add_row(k, str(v))
    for k, v in d["parameters"].items():
        table.add_row(f"params: {k}", f"{v:,}")
    table.add_row(f"FLOPs: encode {refs} reference(s), once", _si(d["flops"]["encode_references"], "FLOP"))
    table.add_row("FLOPs: attend + decode, per frame", _si(d["flops"]["attend_and_decode"], "FLOP"))
    table.add_row("key/value cache", _si(d["kv_cache_bytes"], "B"))
    console.print(table)


def main() -> None:
    app(prog_name="gemx")


if __name__ == "__main__":
    sys.exit(main())

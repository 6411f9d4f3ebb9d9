"""Exports kept in a cache, keyed by checkpoint content and export options, for commands that need
graphs of a checkpoint without the user running `gemx export` first (profile, upscale)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from gemx.errors import GemxError
from gemx.exporter.export import ExportOptions, export
from gemx.exporter.manifest import read_export_dir
from gemx.model.checkpoint import Checkpoint


def default_cache_dir() -> Path:
    return Path(os.environ.get("GEMX_CACHE", Path.home() / ".cache" / "gemx")) / "exports"


def cached_export(ckpt: Checkpoint, block_size: int, max_refs: int, fp16: bool = False, cache_dir: Path | None = None,
                  progress=lambda msg: None) -> tuple[Path, bool]:
    """(export directory, whether it was created now) for this checkpoint at this block size."""
    digest = hashlib.sha256(ckpt.path.read_bytes()).hexdigest()[:12]
    out = (cache_dir or default_cache_dir()) / f"{ckpt.path.stem}-{digest}-b{block_size}-r{max_refs}{'-fp16' if fp16 else ''}"
    if out.exists():
        try:
            read_export_dir(out)  # verified like any export: a damaged cache entry is made again
            return out, False
        except GemxError as e:
            progress(f"re-exporting: the cached export was damaged ({e})")
            shutil.rmtree(out)  # gemx's own cache entry, named by the checkpoint's hash
    progress(f"exporting block size {block_size} (cached for next time in {out.parent})")
    export(ckpt.path, ExportOptions(out=out, block_size=block_size, max_refs=max(max_refs, 2), fp16=fp16, force=True))
    return out, True

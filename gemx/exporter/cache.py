"""Exports kept in a cache, keyed by checkpoint content and export options, for commands that need
graphs of a checkpoint without the user running `gemx export` first (profile, upscale)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from gemx.errors import GemxError
from gemx.exporter.export import ExportOptions, export
from gemx.exporter.manifest import MANIFEST, graphs_revision, read_export_dir
from gemx.fs import cache_root, json_field
from gemx.model.checkpoint import Checkpoint


def cached_export(ckpt: Checkpoint, block_size: int, max_refs: int, precisions: list[str] = ("fp32",),
                  calib: list[Path] = (), cache_dir: Path | None = None, progress=lambda msg: None) -> tuple[Path, bool]:
    """(export directory, whether it was created now) for this checkpoint at this block size and precisions.
    INT8 exports calibrated on named videos are keyed by those videos too."""
    digest = hashlib.sha256(ckpt.path.read_bytes()).hexdigest()[:12]
    fp16, int8 = "fp16" in precisions, "int8" in precisions
    extra = "-fp16" * fp16 + "-int8" * int8
    if int8 and calib:
        extra += "-" + hashlib.sha256("|".join(str(Path(c).resolve()) for c in calib).encode()).hexdigest()[:8]
    out = (cache_dir or cache_root() / "exports") / f"{ckpt.path.stem}-{digest}-b{block_size}-r{max_refs}{extra}"
    if out.exists():
        if json_field(out / MANIFEST, "graphs_revision") != graphs_revision():
            progress("re-exporting: the cached export was made by an older gemx (or other torch/ONNX versions)")
        else:
            try:
                read_export_dir(out)  # verified like any export: a damaged cache entry is made again
                return out, False
            except GemxError as e:
                progress(f"re-exporting: the cached export was damaged ({e})")
        shutil.rmtree(out)  # gemx's own cache entry, named by the checkpoint's hash
    progress(f"exporting block size {block_size} (cached for next time in {out.parent})")
    export(ckpt.path, ExportOptions(out=out, block_size=block_size, max_refs=max(max_refs, 2), fp16=fp16, force=True,
                                    int8=int8, calib=list(calib) if int8 else []))
    return out, True

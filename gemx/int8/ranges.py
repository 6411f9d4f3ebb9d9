"""The INT8 range table: calibrated [lowest, highest] per quantized tensor, per graph, for one checkpoint.

A shipped checkpoint carries its table next to it (`NAME.int8.json`), so `gemx export --int8` needs no video; any
other checkpoint calibrates on `--calib VIDEO|DIR` (`gemx.int8.calibrate`), and the export keeps the table it used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gemx.errors import GemxError
from gemx.fs import atomic_write

RANGES_FORMAT = "gemx-int8-ranges"
RANGES_VERSION = 1
RANGES_FILE = "int8_ranges.json"  # the table an export was quantized with, kept in the export
METHOD = "ptq-minmax"


@dataclass(frozen=True)
class RangeTable:
    """Calibrated [lowest, highest] per quantized tensor, per graph, for one checkpoint."""
    checkpoint_sha256: str
    block_size: int
    source: str  # what it was calibrated on, in words
    frames: int
    graphs: dict[str, dict[str, tuple[float, float]]]

    def to_dict(self) -> dict:
        return {"format": RANGES_FORMAT, "version": RANGES_VERSION, "method": METHOD,
                "checkpoint_sha256": self.checkpoint_sha256, "block_size": self.block_size,
                "calibration": {"source": self.source, "frames": self.frames},
                "graphs": {g: {t: list(r) for t, r in sorted(ranges.items())} for g, ranges in self.graphs.items()}}

    def save(self, path: Path) -> None:
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def shipped_ranges_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".int8.json")


def load_ranges(path: Path, checkpoint_sha256: str) -> RangeTable:
    """A range table, refused unless it is well formed and was calibrated for exactly this checkpoint."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        if d.get("format") != RANGES_FORMAT or d.get("version") != RANGES_VERSION or d.get("method") != METHOD:
            raise ValueError(f"not a {RANGES_FORMAT} v{RANGES_VERSION} table")
        graphs = {g: {t: (float(lo), float(hi)) for t, (lo, hi) in ranges.items()} for g, ranges in d["graphs"].items()}
        if not all(math.isfinite(v) for ranges in graphs.values() for r in ranges.values() for v in r):
            raise ValueError("a range is not finite")
        table = RangeTable(d["checkpoint_sha256"], int(d["block_size"]), str(d["calibration"]["source"]),
                           int(d["calibration"]["frames"]), graphs)
    except OSError as e:
        raise GemxError(f"cannot read INT8 range table {path}: {e.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise GemxError(f"{path} is not a usable INT8 range table ({e}); calibrate again with --calib VIDEO|DIR") from None
    if table.checkpoint_sha256 != checkpoint_sha256:
        raise GemxError(f"{path} was calibrated for another checkpoint; calibrate this one with --calib VIDEO|DIR")
    return table

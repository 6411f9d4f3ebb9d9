"""The INT8 range table: calibrated [lowest, highest] per quantized tensor, per graph, for one checkpoint.

A shipped checkpoint carries its table next to it (`NAME.int8.json`), so `gemx export --int8` needs no video; any
other checkpoint calibrates on `--calib VIDEO|DIR` (`gemx.int8.calibrate`), and the export keeps the table it used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from gemx.errors import GemxError
from gemx.records import Part, Record

RANGES_FILE = "int8_ranges.json"  # the table an export was quantized with, kept in the export
METHOD = "ptq-minmax"
RECALIBRATE = "calibrate again with --calib VIDEO|DIR"


class Calibration(Part):
    source: str  # what it was calibrated on, in words
    frames: int


class RangeTable(Record):
    """Calibrated [lowest, highest] per quantized tensor, per graph (tensors in name order), for one checkpoint."""

    INDENT = 1
    format: Literal["gemx-int8-ranges"] = "gemx-int8-ranges"
    version: Literal[1] = 1
    method: Literal["ptq-minmax"] = METHOD
    checkpoint_sha256: str
    block_size: int
    calibration: Calibration
    graphs: dict[str, dict[str, tuple[float, float]]]

    @field_validator("graphs")
    @classmethod
    def _finite_in_name_order(cls, graphs: dict[str, dict[str, tuple[float, float]]]):
        if not all(math.isfinite(v) for ranges in graphs.values() for r in ranges.values() for v in r):
            raise ValueError("a range is not finite")
        return {g: dict(sorted(ranges.items())) for g, ranges in graphs.items()}


def shipped_ranges_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".int8.json")


def load_ranges(path: Path, checkpoint_sha256: str) -> RangeTable:
    """A range table, refused unless it is well formed and was calibrated for exactly this checkpoint."""
    table = RangeTable.read(path, RECALIBRATE)
    if table.checkpoint_sha256 != checkpoint_sha256:
        raise GemxError(f"{path} was calibrated for another checkpoint; {RECALIBRATE}")
    return table

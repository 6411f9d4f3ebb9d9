"""`--runtime auto` measures instead of guessing: which runtime and precision runs this export fastest here.

The candidates are the runtimes this machine has, each in every precision it runs fast here that is at least as
precise as the one asked: fp32 (the default) allows fp32 only; bf16 or fp16 allow themselves and fp32; int8 allows
all. Each candidate opens a session on the export, encodes MEASURE_REFS references and times a few frames at the
training size; the fastest wins. The choice is recorded in the export (`auto.json`, keyed by the machine: CPU model
and ISA flags, GPU, runtime versions, threads; and by the precision asked) and reused until one of them changes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gemx.contract import graph_precision
from gemx.errors import GemxError
from gemx.exporter.manifest import AUTO_RECORD, read_export_dir
from gemx.frames import sample_frames
from gemx.fs import atomic_write
from gemx.model.lr import downsample

# How precise each precision is: auto may pick one at least as precise as the user asked for (fp16 and bf16 tie).
PRECISE = {"fp32": 0, "fp16": 1, "bf16": 1, "int8": 2}
MEASURE_REFS = 5  # or the export's maximum when fewer: a typical call
WARMUP, TIMED = 2, 7
EXCLUDED = {"torch": "the reference implementation, not a deployment runtime"}


@dataclass
class Choice:
    runtime: str
    precision: str
    asked: str  # the least precise precision the user allowed
    measured: dict[str, float | str] = field(default_factory=dict)  # "runtime precision" -> p50 ms, or why it did not run
    refs: int = MEASURE_REFS
    when: str = ""
    reused: bool = False

    def __str__(self) -> str:
        times = sorted((ms, name) for name, ms in self.measured.items() if isinstance(ms, float))
        best, *rest = times
        others = ", ".join(f"{name} {ms:.1f}" for ms, name in rest[:3])
        why = (f"fastest of {len(times)} measured on this machine ({best[0]:.1f} ms per frame at {self.refs} references"
               f"{'; then ' + others if others else ''}), allowed down to {self.asked}")
        return f"{self.runtime} {self.precision}: {why}" + (f"; measured {self.when}, reused" if self.reused else "")


def machine_key(threads: int | None, asked: str) -> dict:
    """What a measurement depends on besides the export: when any of it changes, auto measures again."""
    import onnxruntime

    from gemx.runtimes.cpu import cpu_flags, cpu_model
    from gemx.runtimes.gpu import detect_gpu, tensorrt_version
    from gemx.runtimes.openvino_session import openvino_version

    gpu, _ = detect_gpu()
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "gpu": gpu.name if gpu else None, "threads": threads,
            "asked": asked, "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino_version()[0],
                                         "tensorrt": tensorrt_version()[0]}}


def candidates(export, asked: str, model) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(runtime, precision) pairs to measure, and why each other pair of this machine's runtimes is left out."""
    from gemx.runtimes.cpu import bf16_native
    from gemx.runtimes.registry import RUNTIME_PRECISIONS, available_runtimes

    pairs, skipped = [], {}
    for runtime in available_runtimes():
        for precision in RUNTIME_PRECISIONS[runtime]:
            name = f"{runtime} {precision}"
            if PRECISE[precision] > PRECISE[asked]:
                continue  # less precise than allowed: not a candidate at all
            if runtime in EXCLUDED:
                skipped[name] = EXCLUDED[runtime]
            elif runtime.startswith("torch") and model is None:
                skipped[name] = "needs the PyTorch model"
            elif graph_precision(precision) not in export.precisions:
                skipped[name] = f"the export has no {graph_precision(precision)} graphs"
            elif precision == "bf16" and not bf16_native()[0]:
                skipped[name] = "no bf16 instructions on this CPU"
            else:
                pairs.append((runtime, precision))
    return pairs, skipped


def choose(export_path: Path, asked: str = "fp32", threads: int | None = None, model=None) -> Choice:
    """The recorded choice for this machine, or a new measurement, recorded."""
    if asked not in PRECISE:
        raise GemxError(f"--precision takes {', '.join(PRECISE)}, got {asked!r}")
    export = read_export_dir(export_path)
    key = machine_key(threads, asked)
    entries = _read(export.path / AUTO_RECORD)
    for entry in entries:
        if entry.get("key") == key:
            choice = Choice(**entry["choice"])
            choice.reused = True
            return choice
    choice = measure(export, asked, threads, model)
    entries = [e for e in entries if e.get("key") != key] + [{"key": key, "choice": asdict(choice)}]
    atomic_write(export.path / AUTO_RECORD, lambda tmp: tmp.write_text(json.dumps({"choices": entries}, indent=2) + "\n"))
    return choice


def measure(export, asked: str, threads: int | None, model) -> Choice:
    from gemx.runtimes.registry import open_session

    pairs, skipped = candidates(export, asked, model)
    if not pairs:
        raise GemxError(f"no runtime here runs {asked} or better on {export.path}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    cfg = export.config
    refs = min(MEASURE_REFS, export.max_refs)
    frames, _ = sample_frames(cfg.size, refs + 1)
    references, target = frames[:refs].numpy(), downsample(frames[refs:], cfg.scale).numpy()
    measured: dict[str, float | str] = dict(skipped)
    for runtime, precision in pairs:
        try:
            with open_session(runtime, export.path, precision, threads, model=model) as session:
                session.set_references(references)
                for _ in range(WARMUP):
                    session(target)
                times = []
                for _ in range(TIMED):
                    start = time.perf_counter()
                    session(target)
                    times.append(time.perf_counter() - start)
            measured[f"{runtime} {precision}"] = float(np.median(times) * 1e3)
        except GemxError as e:  # a runtime that cannot run this export here (a stale build, a missing engine)
            measured[f"{runtime} {precision}"] = str(e)
    timed = {name: ms for name, ms in measured.items() if isinstance(ms, float)}
    if not timed:
        raise GemxError("no runtime could run the export here: " + "; ".join(f"{k}: {v}" for k, v in measured.items()))
    runtime, precision = min(timed, key=timed.get).split(" ")
    return Choice(runtime, precision, asked, measured, refs, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _read(path: Path) -> list[dict]:
    """The recorded choices; a record that is not one (hand-edited, truncated) is measured over, never trusted."""
    try:
        entries = json.loads(path.read_text())["choices"]
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("choice"), dict)
                and set(e["choice"]) == set(Choice.__dataclass_fields__)]
    except (OSError, ValueError, KeyError, TypeError):
        return []

"""Native TensorRT engines built by `gemx build`, run through Polygraphy's TrtRunner.

Before an engine is deserialized, its build record is checked against this machine (TensorRT
version, GPU, compute capability), the export (ONNX sha256) and the requested reference count (the
optimization profile), so the usual TensorRT failures ("Version tag does not match", "generated on
an incompatible device", "does not satisfy any optimization profile") become one clear instruction.
Keys and values stay on the GPU between frames.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemx.errors import GemxError
from gemx.exporter.manifest import ExportDir
from gemx.frames import as_array
from gemx.runtimes.base import Session, missing_backend
from gemx.runtimes.build_record import check_engine_record, engine_dir, read_engine_record


class TensorRTSession(Session):
    name = "tensorrt"

    def __init__(self, export: ExportDir, precision: str = "fp16"):
        record = read_engine_record(export, precision)
        check_engine_record(record, export)
        sizes = record.profile.sizes
        super().__init__(export.contract(record.contract_precision), record.profile.max,
                         tuple(sizes["max"]) if sizes else export.max_size)
        self.min_refs = record.profile.min
        self.max_batch = record.profile.max_batch  # batches above it run in parts
        self.min_size = tuple(sizes["min"]) if sizes else None  # the engine's profile starts here
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            raise missing_backend("TensorRT is not installed") from None
        engines = export.path / engine_dir(precision)
        self.encoder = TrtRunner(EngineFromBytes(BytesFromPath(str(engines / record.engines["reference_encoder"]))))
        self.frame = TrtRunner(EngineFromBytes(BytesFromPath(str(engines / record.engines["frame"]))))
        self.encoder.activate()
        self.frame.activate()

    def _check_profile(self, references: np.ndarray) -> None:
        if 0 < len(references) < self.min_refs:
            raise GemxError(f"{len(references)} references are below this engine's profile minimum {self.min_refs}; "
                            f"rebuild with --refs-min {len(references)}")
        if self.min_size and references.ndim == 4:
            h, w = self.contract.on_grid(references.shape[-2:])
            if h < self.min_size[0] or w < self.min_size[1]:
                raise GemxError(f"references of {references.shape[-1]}x{references.shape[-2]} are below this engine's "
                                f"smallest size {self.min_size[1]}x{self.min_size[0]}; rebuild with --sizes "
                                f"{references.shape[-1]}x{references.shape[-2]},...")

    def set_references(self, references: np.ndarray) -> None:
        references = as_array(references, "references")
        self._check_profile(references)
        self._kv = super().encode(references)  # device-resident; the next encode reuses these buffers
        self.num_references = len(references)

    def encode(self, references: np.ndarray) -> Any:
        """A cache kept apart from the session (one per stream in a server) must outlive the next encode,
        which reuses the runner's device buffers: it is copied to the host."""
        references = as_array(references, "references")
        self._check_profile(references)
        cache = super().encode(references)
        return dataclasses.replace(cache, kv={name: view.numpy() for name, view in cache.kv.items()})

    def _encode(self, references: np.ndarray) -> Any:
        # Device buffers owned by the encoder runner: they live until the next encode, which replaces them anyway.
        return dict(self.encoder.infer({"references": references}, copy_outputs_to_host=False))

    def _decode(self, target_lr: np.ndarray, kv: Any) -> np.ndarray:
        return self.frame.infer({"target_lr": target_lr, **kv})["frame_hr"]

    def close(self) -> None:
        super().close()
        for runner in (self.encoder, self.frame):
            if runner.is_active:
                runner.deactivate()

"""ONNX Runtime, with the CPU, CUDA or TensorRT execution provider.

On a GPU the key/value cache stays on the device: the reference encoder's outputs are bound to
CUDA memory with IO binding and fed to every frame without a host round trip. The TensorRT EP gets
explicit optimization-profile shapes over the refs axis, so it never silently rebuilds an engine
mid-stream when the reference count changes within the range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gemx.contract import Contract, GraphSpec
from gemx.exporter.manifest import TRT_EP_CACHE, ExportDir
from gemx.runtimes.base import Session, missing_backend

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
TRT_EP_MAX_BATCH = 8  # the TensorRT EP's profile reaches frames of this many streams per run; larger batches run in parts


def profile_shapes(contract: Contract, graph: GraphSpec, refs: int, size: tuple[int, int] | None, batch: int = 1) -> str:
    """`name:d0xd1x...` for every input of one graph at `refs` references, an HR size and a batch, as the TensorRT EP
    wants them."""
    return ",".join(f"{s.name}:{'x'.join(map(str, contract.shape(s, refs, size, batch)))}" for s in graph.inputs)


def _providers(provider: str, contract: Contract, graph: GraphSpec, cache: Path, refs_opt: int, refs_max: int,
               max_size: tuple[int, int] | None) -> list[Any]:
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    if provider == "cuda":
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    return [(PROVIDERS["tensorrt"], {
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
        "trt_profile_min_shapes": profile_shapes(contract, graph, 1, (contract.grid, contract.grid) if max_size else None),
        "trt_profile_opt_shapes": profile_shapes(contract, graph, min(refs_opt, refs_max), None),
        "trt_profile_max_shapes": profile_shapes(contract, graph, refs_max, max_size, TRT_EP_MAX_BATCH),
    }), PROVIDERS["cuda"], PROVIDERS["cpu"]]


def ort_source(graph: Path | str | bytes) -> str | bytes:
    """What `InferenceSession` takes for a graph: a serialized graph as it is, a path as a string."""
    return graph if isinstance(graph, bytes) else str(graph)


class OrtSession(Session):
    def __init__(self, export: ExportDir, provider: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 refs_opt: int = 5, graphs: dict[str, Path | str | bytes] | None = None):
        import onnxruntime as ort

        super().__init__(export.contract(precision), export.max_refs, export.max_size)
        self.name = f"ort-{provider}"
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise missing_backend(f"ONNX Runtime's {PROVIDERS[provider]} is not available here (have {', '.join(available)})",
                                  "gpu" if provider != "cpu" else "")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        graphs = graphs or {g: export.graph_path(g, precision) for g in ("reference_encoder", "frame")}
        self.frame_graph = graphs["frame"]  # what runs per frame (a path or a serialized graph, for op-level profiling)
        cache = export.path / TRT_EP_CACHE
        self.encoder, self.frame = (
            ort.InferenceSession(ort_source(graphs[spec.name]), opts,
                                 providers=_providers(provider, self.contract, spec, cache, refs_opt, export.max_refs,
                                                      export.max_size))
            for spec in self.contract.graphs
        )
        self.on_device = provider != "cpu"
        self.max_batch = TRT_EP_MAX_BATCH if provider == "tensorrt" else None
        self.kv_names = [s.name for s in self.contract.kv]

    def _encode(self, references: np.ndarray) -> Any:
        if not self.on_device:
            return dict(zip(self.kv_names, self.encoder.run(self.kv_names, {"references": references}), strict=True))
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("references", references)
        for name in self.kv_names:
            binding.bind_output(name, "cuda")
        self.encoder.run_with_iobinding(binding)
        return dict(zip(self.kv_names, binding.get_outputs(), strict=True))  # OrtValues resident on the GPU

    def _stack(self, kvs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.on_device:
            return super()._stack(kvs)
        import onnxruntime as ort

        # OrtValues on the GPU: stacked through the host (ORT's Python API has no device-side concatenation).
        host = super()._stack([{name: value.numpy() for name, value in kv.items()} for kv in kvs])
        return {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for name, value in host.items()}

    def _decode(self, target_lr: np.ndarray, kv: Any) -> np.ndarray:
        if not self.on_device:
            return self.frame.run(["frame_hr"], {"target_lr": target_lr, **kv})[0]
        binding = self.frame.io_binding()
        binding.bind_cpu_input("target_lr", target_lr)
        for name, value in kv.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("frame_hr", "cuda")
        self.frame.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

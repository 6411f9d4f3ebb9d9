"""PyTorch on CUDA: a GPU path that needs no TensorRT and no onnxruntime-gpu.

It runs the very modules the exporter traces (`ReferenceEncoderGraph`, `FrameGraph`), so FP16 here has
the FP16 graphs' casts exactly: half-precision weights and activations, logits and softmax in FP32, FP32
keys, FP16 values. BF16 runs the FP32 modules under autocast: convolutions and products in bf16 (the range of
FP32, so no overflow to guard), softmax in FP32, keys and values kept as the FP32 contract has them. Keys and values
stay on the GPU. The per-frame call can be captured once per reference set as a CUDA graph and replayed (a small
model at 256x256 is launch-bound, so replay pays).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from gemx.contract import Contract, graph_precision
from gemx.errors import GemxError
from gemx.exporter.graphs import FrameGraph, ReferenceEncoderGraph
from gemx.model.network import GeminoAttention
from gemx.runtimes.base import Session


def cuda_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, f"this PyTorch ({torch.__version__}) has no usable CUDA device"
    return True, ""


BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores


def bf16_on_gpu(name: str, capability: tuple[int, int]) -> tuple[bool, str]:
    """Whether a GPU of this compute capability multiplies bf16 natively (older ones emulate it, slower than FP32)."""
    if tuple(capability) >= BF16_CAPABILITY:
        return True, ""
    return False, (f"this GPU ({name}, sm {capability[0]}.{capability[1]}) has no bf16 tensor cores (sm "
                   f"{BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]} or newer has them); use fp16 or fp32")


class TorchCudaSession(Session):
    name = "torch-cuda"

    def __init__(self, model: GeminoAttention, precision: str = "fp32", max_refs: int | None = None,
                 cuda_graphs: bool = True, max_size: tuple[int, int] | None = None):
        ok, why = cuda_available()
        if not ok:
            raise GemxError(f"the torch-cuda runtime needs an NVIDIA GPU and a CUDA build of PyTorch: {why}")
        if precision == "bf16":
            ok, why = bf16_on_gpu(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
            if not ok:
                raise GemxError(why)
        contract = Contract(model.config, graph_precision(precision))
        super().__init__(contract, max_refs, max_size)
        self.precision = precision
        if precision == "fp32":  # FP32 means FP32: no TF32 tensor-core rounding in convolutions and matmuls
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.device = torch.device("cuda")
        self.encoder = ReferenceEncoderGraph(model, contract).to(self.device).eval()
        self.frame = FrameGraph(model, contract).to(self.device).eval()
        self.cuda_graphs = cuda_graphs
        self._graph: tuple[Any, torch.Tensor, torch.Tensor] | None = None  # (CUDAGraph, static input, static output)

    def _compute(self):
        """The precision's compute: bf16 autocast (its cast cache off, as CUDA graph capture needs), else as built."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    @torch.inference_mode()
    def _encode(self, references: np.ndarray) -> tuple[torch.Tensor, ...]:
        self._graph = None  # a graph is captured against one cache
        with self._compute():
            kv = self.encoder(torch.from_numpy(references).to(self.device))
        return tuple(t.float() for t in kv) if self.precision == "bf16" else kv

    def _stack(self, kvs: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat(parts) for parts in zip(*kvs, strict=True))

    @torch.inference_mode()
    def _decode(self, target_lr: np.ndarray, kv: tuple[torch.Tensor, ...]) -> np.ndarray:
        x = torch.from_numpy(target_lr).to(self.device, non_blocking=True)
        if not self.cuda_graphs or self._kv is None or kv is not self._kv.kv:  # replay only for this session's own cache
            with self._compute():
                return self.frame(x, kv).float().cpu().numpy()
        if self._graph is None:
            self._graph = self._capture(x, kv)
        graph, static_in, static_out = self._graph
        static_in.copy_(x)
        graph.replay()
        return static_out.float().cpu().numpy()

    def _capture(self, x: torch.Tensor, kv: tuple[torch.Tensor, ...]):
        static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._compute():
            for _ in range(2):  # warm up kernels and allocator outside the capture
                self.frame(static_in, kv)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._compute():
            static_out = self.frame(static_in, kv)
        return graph, static_in, static_out

    def close(self) -> None:
        super().close()
        self._graph = None

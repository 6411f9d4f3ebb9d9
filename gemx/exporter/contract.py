"""The graph contract: the one declaration of graph names, tensor names, shapes, dtypes and the `refs` axis.

The exporter writes graphs to it, the manifest records it, the runtimes feed and check against it,
and the tests read it, in the spirit of Optimum's `OnnxConfig`. Nothing else in gemx spells a
graph input name.

Key/value layout, per attention level i (M = blocks per frame, BB = tokens per block, C = channels):
    key_i   [M, C, refs, BB]  unit vectors over C divided by the temperature; channel-major, the right-hand side
                              of the logits product; float32, and in INT8 graphs int8 where C >= 64 (symmetric,
                              one calibrated scale per level: the logits then run as an int8 product with float
                              output; a shallower product is bound by writing its output, and on ONNX Runtime's
                              x86 kernels slower in int8 than in float)
    value_i [M, refs, BB, C]  float32; float16 in FP16 graphs (half the cache); int8 in INT8 graphs (a quarter:
                              symmetric, one calibrated scale per level, held by both graphs)
Both keep `refs` in a dimension of its own, beside BB: the frame graph merges the two by a free reshape, so per
frame only the target's queries are re-laid out (see `gemx.model.network`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemx.errors import GemxError
from gemx.model.config import ModelConfig

REFS = "refs"
PRECISIONS = ("fp32", "fp16", "int8")  # int8: QDQ graphs with float frames in and out, an int8 reference cache
INT8_KEY_MIN_CHANNELS = 64  # keys of fewer channels stay float32 in the INT8 contract (see the layout above)
MAX_REFS = 64  # the most references an export validates (the paper measures up to 10)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a symbolic dimension
    dtype: str  # numpy dtype name

    def concrete(self, refs: int) -> tuple[int, ...]:
        return tuple(refs if d == REFS else d for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def file(self, precision: str) -> str:
        return f"{self.name}.onnx" if precision == "fp32" else f"{self.name}.{precision}.onnx"

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)


@dataclass(frozen=True)
class Contract:
    config: ModelConfig
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise GemxError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if not self.config.attention_levels:
            raise GemxError(f"a {self.config.arch} model uses no references; gemx deploys reference-based models (attention, coarse)")

    @property
    def kv(self) -> tuple[TensorSpec, ...]:
        """Key and value specs, interleaved per level: key_i, value_i, ..."""
        cfg, specs = self.config, []
        value_dtype = {"fp16": "float16", "int8": "int8"}.get(self.precision, "float32")
        for i in cfg.attention_levels:
            b, c = cfg.block_at(i), cfg.channels[i]
            m = (cfg.level_sizes[i] // b) ** 2
            key_dtype = "int8" if self.precision == "int8" and c >= INT8_KEY_MIN_CHANNELS else "float32"
            specs.append(TensorSpec(f"key_{i}", (m, c, REFS, b * b), key_dtype))
            specs.append(TensorSpec(f"value_{i}", (m, REFS, b * b, c), value_dtype))
        return tuple(specs)

    @property
    def reference_encoder(self) -> GraphSpec:
        s = self.config.size
        return GraphSpec("reference_encoder", (TensorSpec("references", (REFS, 3, s, s), "float32"),), self.kv)

    @property
    def frame(self) -> GraphSpec:
        s, lr = self.config.size, self.config.lr_size
        return GraphSpec(
            "frame",
            (TensorSpec("target_lr", (1, 3, lr, lr), "float32"), *self.kv),
            (TensorSpec("frame_hr", (1, 3, s, s), "float32"),),
        )

    @property
    def graphs(self) -> tuple[GraphSpec, GraphSpec]:
        return (self.reference_encoder, self.frame)

    def kv_bytes(self, refs: int) -> int:
        """Bytes of one reference set's keys and values."""
        import numpy as np

        return sum(int(np.prod(s.concrete(refs))) * np.dtype(s.dtype).itemsize for s in self.kv)

    def refs_axis(self, spec: TensorSpec) -> int:
        return spec.shape.index(REFS)

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

Spatial axes are symbolic: `references [refs, 3, height, width]`, `target_lr [batch, 3, lr_height, lr_width]`,
`frame_hr [batch, 3, height, width]`, and the caches' first axis `blocks_i` = blocks of level i in a frame of that
size. Height and width are multiples of the grid (the coarsest attention block in pixels, 64 for the shipped
model) up to the largest size the export validated; `gemx.runtimes` pads other sizes to the grid.

The frame graph runs a batch of frames of different streams, each against its own stream's cache: the frame
graph's caches are the batch's caches stacked on their first axis, stream after stream (`batch_blocks_i` = batch x
blocks_i), in the order of the frames in `target_lr`. Streams in one batch share a frame size and a reference
count; a cache is encoded per stream (the reference encoder has no batch axis: its `refs` is one stream's).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemx.errors import GemxError
from gemx.model.config import ModelConfig

REFS = "refs"
BATCH = "batch"  # frames of different streams in one frame-graph run
HEIGHT, WIDTH = "height", "width"  # of the HR frame and references
LR_HEIGHT, LR_WIDTH = "lr_height", "lr_width"  # of the LR target: the HR size over the scale
DEFAULT_MAX_SIZE = (1088, 1920)  # (height, width) validated by default: 1080p on a 64-pixel grid
PRECISIONS = ("fp32", "fp16", "int8")  # int8: QDQ graphs with float frames in and out, an int8 reference cache
# Precisions a runtime computes in from another precision's graphs: bf16 is OpenVINO's mode for the FP32 graphs on a CPU
# that multiplies bf16 (frames and caches stay float32 at the graphs' edges).
COMPUTE_PRECISIONS = {"bf16": "fp32"}


def within(size: tuple[int, int], largest: tuple[int, int]) -> bool:
    """Whether frames of `size` (height, width) fit the largest validated size in either orientation: nothing in the
    graphs depends on which side is longer (their shape arithmetic reads both, and a frame and its transpose cost the
    same), so 1920x1088 also validates a phone's portrait 1088x1920."""
    (short, long), (short_max, long_max) = sorted(size), sorted(largest)
    return short <= short_max and long <= long_max


def graph_precision(precision: str) -> str:
    """Which of an export's graphs a session of `precision` runs."""
    return COMPUTE_PRECISIONS.get(precision, precision)
INT8_KEY_MIN_CHANNELS = 64  # keys of fewer channels stay float32 in the INT8 contract (see the layout above)
VALIDATE_BATCH = 3  # streams an export runs through the frame graph at once, checked against one by one
MAX_REFS = 64  # the most references an export validates (the paper measures up to 10)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a symbolic dimension
    dtype: str  # numpy dtype name

    def concrete(self, refs: int, dims: dict[str, int] | None = None) -> tuple[int, ...]:
        """The shape with `refs` and the spatial symbols resolved (see `Contract.dims`)."""
        dims = {**(dims or {}), REFS: refs}
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

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
        """Key and value specs of one stream, interleaved per level: key_i, value_i, ... (the reference encoder's
        outputs; the frame graph takes a batch's, see `batch_kv`)."""
        return self._kv(batched=False)

    @property
    def keys(self) -> tuple[TensorSpec, ...]:
        """The key specs of `kv` (key_0, key_1, ...): the logits' right-hand side."""
        return self.kv[0::2]

    @property
    def batch_kv(self) -> tuple[TensorSpec, ...]:
        """The frame graph's key and value inputs: the caches of a batch's streams stacked on the first axis."""
        return self._kv(batched=True)

    def _kv(self, batched: bool) -> tuple[TensorSpec, ...]:
        cfg, specs = self.config, []
        value_dtype = {"fp16": "float16", "int8": "int8"}.get(self.precision, "float32")
        for i in cfg.attention_levels:
            b, c = cfg.block_at(i), cfg.channels[i]
            key_dtype = "int8" if self.precision == "int8" and c >= INT8_KEY_MIN_CHANNELS else "float32"
            m = f"blocks_{i}" if self.any_size else 1
            if batched:
                m = f"{BATCH}_{m}" if self.any_size else BATCH
            specs.append(TensorSpec(f"key_{i}", (m, c, REFS, b * b), key_dtype))
            specs.append(TensorSpec(f"value_{i}", (m, REFS, b * b, c), value_dtype))
        return tuple(specs)

    @property
    def any_size(self) -> bool:
        """Whether the graphs take any size on the grid: block attention does; the coarse baseline attends over the
        whole coarsest map, whose token count is the frame's, so its graphs keep the training size."""
        return self.config.arch == "attention"

    @property
    def reference_encoder(self) -> GraphSpec:
        h, w = (HEIGHT, WIDTH) if self.any_size else self.default_size
        return GraphSpec("reference_encoder", (TensorSpec("references", (REFS, 3, h, w), "float32"),), self.kv)

    @property
    def frame(self) -> GraphSpec:
        h, w = (HEIGHT, WIDTH) if self.any_size else self.default_size
        lh, lw = (LR_HEIGHT, LR_WIDTH) if self.any_size else (self.config.lr_size, self.config.lr_size)
        return GraphSpec(
            "frame",
            (TensorSpec("target_lr", (BATCH, 3, lh, lw), "float32"), *self.batch_kv),
            (TensorSpec("frame_hr", (BATCH, 3, h, w), "float32"),),
        )

    @property
    def grid(self) -> int:
        """Height and width of a frame are multiples of this (the coarsest attention block, in pixels)."""
        return self.config.grid

    @property
    def default_size(self) -> tuple[int, int]:
        """The size the model was trained at (height, width): what examples and sweeps use unless told."""
        return (self.config.size, self.config.size)

    def on_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The smallest size on the grid that holds `size` (height, width)."""
        g = self.grid
        return tuple(-(-side // g) * g for side in size)

    def dims(self, size: tuple[int, int] | None = None, batch: int = 1) -> dict[str, int]:
        """The symbols at an HR size on the grid (height, width; default: the training size) and a batch size."""
        h, w = size or self.default_size
        cfg = self.config
        dims = {BATCH: batch, HEIGHT: h, WIDTH: w, LR_HEIGHT: h // cfg.scale, LR_WIDTH: w // cfg.scale}
        for i in cfg.attention_levels:
            b = cfg.block_at(i)
            dims[f"blocks_{i}"] = ((h >> (i + 1)) // b) * ((w >> (i + 1)) // b)
            dims[f"{BATCH}_blocks_{i}"] = batch * dims[f"blocks_{i}"]
        return dims

    def shape(self, spec: TensorSpec, refs: int, size: tuple[int, int] | None = None, batch: int = 1) -> tuple[int, ...]:
        return spec.concrete(refs, self.dims(size, batch))

    @property
    def graphs(self) -> tuple[GraphSpec, GraphSpec]:
        return (self.reference_encoder, self.frame)

    def kv_bytes(self, refs: int, size: tuple[int, int] | None = None) -> int:
        """Bytes of one reference set's keys and values, at an HR size on the grid (default: the training size)."""
        import numpy as np

        return sum(int(np.prod(self.shape(s, refs, size))) * np.dtype(s.dtype).itemsize for s in self.kv)

    def refs_axis(self, spec: TensorSpec) -> int:
        return spec.shape.index(REFS)

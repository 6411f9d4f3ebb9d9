"""Model configuration and the named presets.

A config fully determines the architecture, so it travels inside every checkpoint and manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gemx.errors import GemxError

ARCHS = ("attention", "sisr", "coarse")
SCALES = (4, 8)
# What the model can sensibly be (the paper's model: 384x384, 512 channels). Configs beyond these fail inside
# torch's allocator, so they are refused first, in one line that names the bound.
MAX_SIZE = 4096
MAX_CHANNELS = 1024
MAX_BYTES = 2 << 30  # of the weights, and of the largest activation of one frame


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes the network.

    arch: "attention" (the paper's multi-level block attention), "sisr" (same encoder-decoder, no
        references) or "coarse" (full attention at the coarsest level only, no skips).
    size: side of the square HR frame; the three feature levels are size/2, size/4, size/8.
    scale: LR downsampling factor (4 or 8).
    channels: feature channels of the three encoder levels.
    block_size: side B of the attention blocks, in feature cells, the same at every level.
    robust: the decoder also sees the target's own (query) features at every level, so references of
        the wrong content cannot take away what the low-resolution frame itself shows.
    residual: the decoder predicts a correction to the bicubic upsample of the target instead of the
        whole frame (the network starts as bicubic and learns the missing detail).
    """

    arch: str = "attention"
    size: int = 256
    scale: int = 4
    channels: tuple[int, int, int] = (32, 64, 128)
    block_size: int = 8
    robust: bool = False
    residual: bool = False
    preset: str = "custom"

    def __post_init__(self) -> None:
        for name in ("size", "scale", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GemxError(f"model config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.channels, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in self.channels):
            raise GemxError(f"model config: channels must be three positive integers, got {self.channels!r}")
        for name in ("robust", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise GemxError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.arch not in ARCHS:
            raise GemxError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.scale not in SCALES:
            raise GemxError(f"scale {self.scale} is not supported; use 4 or 8")
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise GemxError(f"channels must be three positive numbers, got {self.channels}")
        if self.size > MAX_SIZE:
            raise GemxError(f"frame size {self.size} is above the {MAX_SIZE} gemx supports")
        if max(self.channels) > MAX_CHANNELS:
            raise GemxError(f"channels {list(self.channels)} exceed the {MAX_CHANNELS} per level gemx supports")
        if self.activation_bytes > MAX_BYTES:
            raise GemxError(f"frame size {self.size} with {self.channels[0]} channels at the finest level needs "
                            f"{self.activation_bytes / 2**30:.1f} GiB per activation, above the {MAX_BYTES >> 30} GiB gemx "
                            "supports; use a smaller size or fewer channels")
        if self.size % 8 or self.size % self.scale:
            raise GemxError(f"frame size {self.size} must be a multiple of 8 and of the scale {self.scale}")
        if self.arch == "attention":
            for side in self.level_sizes:
                if side % self.block_size:
                    raise GemxError(
                        f"block size {self.block_size} does not divide the {side}x{side} feature map "
                        f"(levels {self.level_sizes} at frame size {self.size}); choose a block size that "
                        f"divides {self.level_sizes[-1]}"
                    )

    @property
    def level_sizes(self) -> tuple[int, int, int]:
        return (self.size // 2, self.size // 4, self.size // 8)

    @property
    def activation_bytes(self) -> int:
        """The largest float32 activation of one frame: the finest features, upsampled to the full frame."""
        return 4 * self.channels[0] * self.size * self.size

    @property
    def grid(self) -> int:
        """Frame sides must be multiples of this: the coarsest attention block, in pixels."""
        return 8 * max([self.block_at(i) for i in self.attention_levels] or [1])

    @property
    def lr_size(self) -> int:
        return self.size // self.scale

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """Indices of the levels that attend to references (empty for SISR)."""
        return {"attention": (0, 1, 2), "coarse": (2,), "sisr": ()}[self.arch]

    def block_at(self, level: int) -> int:
        """Attention block side at a level; the coarse baseline attends over the whole map."""
        return self.level_sizes[level] if self.arch == "coarse" else self.block_size

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise GemxError(f"model config must be a mapping of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GemxError(f"model config has unknown fields {sorted(unknown)}; was it written by a newer gemx?")
        return cls(**d)


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    about: str = field(default="")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("paper", ModelConfig(size=384, channels=(128, 256, 512), block_size=12, preset="paper"),
               "the paper's model: 384x384, levels 192/96/48, 512 channels at 48x48, 12x12 blocks"),
        Preset("small", ModelConfig(size=256, channels=(32, 64, 96), block_size=8, preset="small"),
               "the CPU default: 256x256, trains and runs on 2 cores"),
        Preset("tiny", ModelConfig(size=64, channels=(8, 16, 16), block_size=4, preset="tiny"),
               "for tests: 64x64, a few thousand parameters"),
    )
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of a named preset, with optional field overrides (arch, scale, block_size, ...)."""
    if name not in PRESETS:
        raise GemxError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].config.replace(**overrides)

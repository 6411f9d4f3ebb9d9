"""The multi-reference super-resolution network (Figure 3 of the paper), and its two baselines.

Read top to bottom: an encoder, block attention, a decoder, then the model that wires them.
The model is split at the deployment seam: `encode_references` runs once per reference set and
returns the key/value cache, `attend_and_decode` runs for every frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gemx.errors import GemxError
from gemx.model.config import MAX_BYTES, ModelConfig
from gemx.model.lr import synthesize_lr, upsample_bicubic

INITIAL_TEMPERATURE = 0.1  # cosine logits / 0.1: a softmax over [-10, 10], sharp enough to copy, soft enough to learn


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` that emits nothing when the dtype already matches (a no-op cast trips torch.export)."""
    return t if t.dtype == dtype else t.to(dtype)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class Encoder(nn.Module):
    """3 levels, each two conv3x3+ReLU then a stride-2 conv: features at size/2, size/4, size/8."""

    def __init__(self, channels: tuple[int, int, int]):
        super().__init__()
        levels, cin = [], 3
        for c in channels:
            levels.append(nn.Sequential(
                conv3x3(cin, c), nn.ReLU(inplace=True),
                conv3x3(c, c), nn.ReLU(inplace=True),
                conv3x3(c, c, stride=2),
            ))
            cin = c
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """Mirror of the encoder: conv3x3+ReLU pairs and bilinear x2 upsampling, finer levels as skips.

    `inputs[l]` is the channel count arriving at level l (0 where a level has no skip). Each level
    narrows to the next finer level's width, as the encoder widened.
    """

    def __init__(self, channels: tuple[int, int, int], inputs: tuple[int, int, int]):
        super().__init__()
        c1, c2, c3 = channels
        self.level3 = conv_pair(inputs[2], c3, c2)
        self.level2 = conv_pair(c2 + inputs[1], c2, c1)
        self.level1 = conv_pair(c1 + inputs[0], c1, c1)
        self.head = nn.Sequential(conv3x3(c1, max(c1 // 2, 3)), nn.ReLU(inplace=True), conv3x3(max(c1 // 2, 3), 3))

    def forward(self, feats: list[list[torch.Tensor]], subpixel: bool = False) -> torch.Tensor:
        """`feats[l]`: what reaches level l (attention output, the target's own features), possibly empty.
        `subpixel`: the head as `subpixel_head` computes it (the INT8 graphs' form)."""
        x = level_forward(self.level3, feats[2])
        for level, skip in ((self.level2, feats[1]), (self.level1, feats[0])):
            x = level_forward(level, [upsample2x(x), *skip])
        return subpixel_head(self.head, x) if subpixel else self.head(upsample2x(x))


def level_forward(pair: nn.Sequential, parts: list[torch.Tensor]) -> torch.Tensor:
    """A conv pair applied to the channel concatenation of `parts`, without concatenating: the first conv is a sum
    of convolutions over each part's slice of its weight (the same numbers to float rounding). Every part then
    stays in ONNX Runtime's blocked conv layout and no Concat has to be re-laid out."""
    conv = pair[0]
    out, start = None, 0
    for x in parts:
        w = conv.weight[:, start:start + x.shape[1]]
        y = F.conv2d(x, w, conv.bias if out is None else None, conv.stride, conv.padding)
        out = y if out is None else out + y
        start += x.shape[1]
    return pair[3](pair[2](pair[1](out)))


def subpixel_head(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`head(upsample2x(x))` (conv3x3, ReLU, conv3x3) computed at x's resolution on the 2x2 phases of its output.

    The bilinear upsampling folds into the first convolution (each of its outputs in 4 phases, 3x3 over x); the
    second convolution runs on those phases (each RGB output in 4 phases); a pixel shuffle lays the RGB phases out.
    The same weights and the same numbers inside the frame; on the frame's outer 2 pixels it differs, since the first
    convolution reads x edge-padded, i.e. the upsampled features replicated where `head` reads zero padding (an
    upsampling followed by zero padding is no single convolution of x). On the shipped model that border moves the
    output by 59-64 dB PSNR and the test split's video-mean PSNR by -0.01 dB. Why: both convolutions then run with
    4x the channels at a quarter of the pixels, with no upsampled tensor in between, which int8 convolutions turn into
    speed (see the INT8 graphs in `gemx.int8.qdq`)."""
    conv1, conv2 = head[0], head[2]
    up = _upsample_taps(x)  # [phase, tap of the full-resolution kernel, tap over x]
    w1 = torch.einsum("ocyx,ayk,bxl->oabckl", conv1.weight, up, up).flatten(0, 2)
    y = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w1, conv1.bias.repeat_interleave(4)))
    moves = _phase_moves(x)  # [output phase, tap of the full-resolution kernel, input phase, tap over the phases]
    w2 = torch.einsum("ocyx,aypk,bxql->oabcpqkl", conv2.weight, moves, moves).flatten(0, 2).flatten(1, 3)
    return F.pixel_shuffle(F.conv2d(y, w2, conv2.bias.repeat_interleave(4), padding=1), 2)


def _upsample_taps(like: torch.Tensor) -> torch.Tensor:
    """[a, d, e]: the weight of x[i + e - 1] in upsample2x's row 2i + a + d - 1 (bilinear, half-pixel centres)."""
    taps = torch.zeros(2, 3, 3, dtype=like.dtype, device=like.device)
    between = {0: {-1: 0.25, 0: 0.75}, 1: {0: 0.75, 1: 0.25}}  # row 2j + p of the upsampled image over x[j + t]
    for a in (0, 1):
        for d in (-1, 0, 1):
            j, p = divmod(a + d, 2)
            for t, w in between[p].items():
                taps[a, d + 1, j + t + 1] += w
    return taps


def _phase_moves(like: torch.Tensor) -> torch.Tensor:
    """[a, d, p, e]: 1 where full-resolution row 2i + a + d - 1 is phase p of row i + e - 1."""
    moves = torch.zeros(2, 3, 2, 3, dtype=like.dtype, device=like.device)
    for a in (0, 1):
        for d in (-1, 0, 1):
            j, p = divmod(a + d, 2)
            moves[a, d + 1, p, j + 1] = 1
    return moves


def conv_pair(cin: int, mid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(cin, mid), nn.ReLU(inplace=True), conv3x3(mid, cout), nn.ReLU(inplace=True))


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


# --- block attention ------------------------------------------------------------------------------
# Layouts (M = batch * number of blocks, BB = B*B tokens per block, R = references, C = channels):
#   queries and attention output [M, BB, C]; values [M, R, BB, C]; keys (already divided by the temperature)
#   [M, C, R, BB]. Logits [M, BB, R*BB] = Q K and out [M, BB, C] = softmax(logits) V are both plain MatMuls (R
# merges into the token axis by a free reshape), the form every runtime runs in int8: ONNX Runtime has no
# transposed int8 MatMul. Keys are channel-major because they are the product's right-hand side; the encoder lays
# them out once per reference set.
# Blocks are formed in two moves that ONNX Runtime's Transpose does fast: a plain NCHW -> NHWC transpose (which
# ORT folds into the Reorder after its blocked convolutions), then swapping block rows with block columns, which
# moves runs of B*C contiguous values. A single permute straight to blocks moves runs of B values, or single
# values: several times slower (docs/architecture.md). Per frame only the target's queries are re-laid out; the
# cache is blocked once per set.

def value_blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """Values [N, R, C, H, W] -> [M, R, BB, C]."""
    n, _, c, h, w = x.shape
    x = x.reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(n, -1, h // b, b, w // b, b * c)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n * (h // b) * (w // b), -1, b * b, c)


def key_blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """Keys [N, R, C, H, W] -> [M, C, R, BB]: one permute (runs of B values), done once per reference set."""
    n, r, c, h, w = x.shape
    x = x.reshape(n, r, c, h // b, b, w // b, b).permute(0, 3, 5, 2, 1, 4, 6)
    return x.reshape(n * (h // b) * (w // b), c, r, b * b)


def query_blocks(q: torch.Tensor, b: int) -> torch.Tensor:
    """[N, C, H, W] -> [M, BB, C]."""
    n, c, h, w = q.shape
    x = q.permute(0, 2, 3, 1).reshape(n, h // b, b, w // b, b * c).transpose(2, 3)
    return x.reshape(-1, b * b, c)


def unblock(x: torch.Tensor, n: int, c: int, h: int, w: int, b: int) -> torch.Tensor:
    """[M, BB, C] -> [N, C, H, W], the inverse of `query_blocks`."""
    x = x.reshape(n, h // b, w // b, b, b * c).transpose(2, 3)
    return x.reshape(n, h, w, c).permute(0, 3, 1, 2)


def unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`F.normalize(x, dim=dim)` (the same numbers) without the Expand it exports."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(1e-12)


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(Q K) V per block: queries [M, BB, C]; keys [M, C, R, BB]; values [M, R, BB, C] -> [M, BB, C].

    Logits and softmax run in float32 whatever the activations are: they are the numerically
    sensitive step of a half-precision network.
    """
    m, c = keys.shape[:2]
    logits = torch.matmul(cast(queries, torch.float32), cast(keys.reshape(m, c, -1), torch.float32))  # [M, BB, R*BB]
    attn = cast(torch.softmax(logits, dim=-1), values.dtype)
    return torch.matmul(attn, values.reshape(m, -1, c))


def block_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, b: int) -> torch.Tensor:
    """softmax(Q K) V inside each BxB block, over the same block of every reference (Q as given: the model
    normalises its queries after blocking, see `attend_and_decode`).

    q: [N, C, H, W]; keys, values: blocked as above, the temperature folded into the keys.
    """
    n, c, h, w = q.shape
    return unblock(attend(query_blocks(q, b), keys, values), n, c, h, w, b)


@dataclass
class ReferenceCache:
    """Per attention level, keys [M, C, R, BB] and values [M, R, BB, C]: all a frame needs of the references."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_references(self) -> int:
        return self.values[0].shape[1] if self.values else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class GeminoAttention(nn.Module):
    """Multi-resolution multi-reference super-resolution by implicit warping.

    A shared key/query encoder sees LR frames (references -> keys, target -> queries), a value
    encoder sees HR references (-> values). Attention at every level warps reference detail onto
    the target; the coarsest result feeds the decoder and the finer ones are U-Net skips.
    The `sisr` and `coarse` archs of the config are the paper's two baselines.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        self.kq_encoder = Encoder(ch)
        levels = config.attention_levels
        if levels:
            self.value_encoder = Encoder(ch)
            # Queries and keys are L2-normalised per token (cosine attention), so the learnt temperature
            # alone sets how sharp the attention is. Without it the unnormalised encoder features grew
            # until the softmax saturated to one-hot and stopped passing gradient (seen training `small`).
            self.log_temperature = nn.Parameter(torch.full((len(levels),), math.log(INITIAL_TEMPERATURE)))
        # What reaches the decoder at each level: attention output, the target's own features
        # (SISR, or robust), or both (robust); the coarse baseline has no skips.
        widths = []
        for i, c in enumerate(ch):
            attended = c if i in levels else 0
            own = c if (config.arch == "sisr" or config.robust) else 0
            skip = config.arch != "coarse" or i == 2
            widths.append(attended + own if skip else 0)
        self.decoder = Decoder(ch, tuple(widths))
        if config.residual:  # start exactly at bicubic
            nn.init.zeros_(self.decoder.head[-1].weight)
            nn.init.zeros_(self.decoder.head[-1].bias)

    # -- the deployment seam ---------------------------------------------------------------------
    def encode_references(self, refs_hr: torch.Tensor) -> ReferenceCache:
        """HR references [N, R, 3, H, W] (or [R, 3, H, W]) -> the key/value cache. Runs once per set."""
        if refs_hr is not None and refs_hr.dim() == 4:
            refs_hr = refs_hr.unsqueeze(0)
        self._check_frames(refs_hr, "references", ndim=5)
        if refs_hr.shape[1] == 0:
            raise GemxError("no references given; pass at least one high-resolution reference frame")
        levels = self.config.attention_levels
        if not levels:
            return ReferenceCache([], [])
        n, r = refs_hr.shape[:2]
        flat = refs_hr.reshape(n * r, *refs_hr.shape[2:])
        keys = self.kq_encoder(synthesize_lr(flat, self.config.scale))
        values = self.value_encoder(flat)
        cache = ReferenceCache([], [])
        for j, i in enumerate(levels):
            b = self.config.block_at(i)
            k = F.normalize(cast(keys[i], torch.float32), dim=1) * torch.exp(-cast(self.log_temperature[j], torch.float32))
            cache.keys.append(key_blocks(k.reshape(n, r, *k.shape[1:]), b))
            cache.values.append(value_blocks(values[i].reshape(n, r, *values[i].shape[1:]), b))
        return cache

    def attend_and_decode(self, target_lr: torch.Tensor, cache: ReferenceCache, subpixel_head: bool = False) -> torch.Tensor:
        """LR target [N, 3, H/scale, W/scale] (as a receiver gets it) + cache -> HR frame [N, 3, H, W].
        `subpixel_head`: the decoder's last upsampling and head as `subpixel_head` computes them."""
        self._check_frames(target_lr, "target_lr", ndim=4, factor=self.config.scale)
        upsampled = upsample_bicubic(target_lr, self.config.scale)
        queries = self.kq_encoder(upsampled)
        levels = self.config.attention_levels
        if levels and not cache.keys:
            raise GemxError("this model attends to references: call encode_references first")
        if levels and cache.keys[-1].shape[0] != self._num_blocks(target_lr, levels[-1]):
            raise GemxError("the target frame and the cached references differ in size; encode references of the target's size")
        feats: list[list[torch.Tensor]] = []
        for i, q in enumerate(queries):
            parts = []
            if i in levels:
                j = levels.index(i)
                b = self.config.block_at(i)
                queries = unit(cast(query_blocks(q, b), torch.float32), dim=-1)  # cosine attention: unit-norm tokens
                parts.append(unblock(attend(queries, cache.keys[j], cache.values[j]), *q.shape, b))
            if self.config.arch == "sisr" or self.config.robust:
                parts.append(q)
            feats.append(parts)
        if self.config.arch == "coarse":
            feats[0] = feats[1] = []
        out = self.decoder(feats, subpixel_head)
        return out + upsampled if self.config.residual else out

    def forward(self, target_lr: torch.Tensor, refs_hr: torch.Tensor | None = None) -> torch.Tensor:
        cache = ReferenceCache([], []) if self.config.arch == "sisr" else self.encode_references(refs_hr)
        return self.attend_and_decode(target_lr, cache)

    def _num_blocks(self, target_lr: torch.Tensor, level: int) -> int:
        side_h, side_w = (s * self.config.scale // 2 ** (level + 1) for s in target_lr.shape[-2:])
        b = self.config.block_at(level)
        return target_lr.shape[0] * (side_h // b) * (side_w // b)

    def _check_frames(self, x: torch.Tensor, name: str, ndim: int, factor: int = 1) -> None:
        """Frames are [N, 3, H, W] (refs [N, R, 3, H, W]); H, W times `factor` must tile the blocks.

        The network is fully convolutional, so any size on the block grid works (training uses crops);
        deployment graphs fix the size to the config's.
        """
        grid = self.config.grid // factor
        layout = "[N, R, 3, H, W]" if ndim == 5 else "[N, 3, H, W]"
        if x is None or x.dim() != ndim or x.shape[-3] != 3 or x.shape[-1] % grid or x.shape[-2] % grid:
            got = "nothing" if x is None else list(x.shape)
            size = self.config.size // factor
            raise GemxError(f"{name} must be RGB frames {layout} with H, W = {size} (or multiples of {grid}), got {got}")


def with_block_size(model: GeminoAttention, block_size: int | None) -> GeminoAttention:
    """The same weights with another attention block size (block size shapes no parameter)."""
    if block_size is None or block_size == model.config.block_size:
        return model
    other = build_model(model.config.replace(block_size=block_size))
    other.load_state_dict(model.state_dict())
    return other.eval()


def build_model(config: ModelConfig) -> GeminoAttention:
    """The model of a config, refused in one line when its weights alone would exceed what gemx supports."""
    with torch.device("meta"):  # counts the parameters without allocating them
        params = sum(p.numel() for p in GeminoAttention(config).parameters())
    if 4 * params > MAX_BYTES:
        raise GemxError(f"channels {list(config.channels)} make {params / 1e9:.1f} G parameters ({4 * params / 2**30:.1f} GiB), "
                        f"above the {MAX_BYTES >> 30} GiB gemx supports; use fewer channels")
    return GeminoAttention(config)

"""Low-resolution synthesis, in exactly one place.

LR = bicubic upsample(average-pool downsample by the scale factor), back to the HR size.

The fixed-factor bicubic upsample is written as a depthwise convolution followed by a pixel shuffle:
it equals `F.interpolate(mode="bicubic", align_corners=False)` to float rounding, and it exports to
ONNX as Pad(edge) + Conv + DepthToSpace, all of which TensorRT parses (a cubic Resize is not in
TensorRT's documented operator table).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CUBIC_A = -0.75  # PyTorch's (and ONNX Resize's default) bicubic coefficient


def _cubic(t: float) -> float:
    t = abs(t)
    a = CUBIC_A
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


@functools.cache
def _phase_taps(scale: int) -> torch.Tensor:
    """[scale, 5] weights: output phase p reads input pixels i-2..i+2 (half-pixel centres)."""
    taps = torch.zeros(scale, 5, dtype=torch.float64)
    for p in range(scale):
        x = (p + 0.5) / scale - 0.5  # source coordinate relative to input pixel i
        base = int(torch.floor(torch.tensor(x)).item())
        frac = x - base
        for offset in range(-1, 3):  # the 4 cubic neighbours base-1 .. base+2
            taps[p, base + offset + 2] += _cubic(offset - frac)
    return taps


def upsample_bicubic(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic x`scale` upsampling of [N, C, h, w] as one depthwise conv and a pixel shuffle."""
    n, c, h, w = x.shape
    taps = _phase_taps(scale).to(x.dtype)
    kernel = torch.einsum("pi,qj->pqij", taps, taps).reshape(scale * scale, 1, 5, 5)
    kernel = kernel.repeat(c, 1, 1, 1).to(x.device)  # [c*s*s, 1, 5, 5], groups=c
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    phases = F.conv2d(padded, kernel, groups=c)
    return F.pixel_shuffle(phases, scale)


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR frame a receiver gets: average pooling by `scale`."""
    return F.avg_pool2d(x, scale)


def synthesize_lr(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The paper's LR input: downsample by `scale`, then bicubically upsample back to the HR size."""
    return upsample_bicubic(downsample(x, scale), scale)

"""Low-resolution synthesis, in exactly one place.

LR = bicubic upsample(average-pool downsample by the scale factor), back to the HR size.

The fixed-factor bicubic upsample is written as a depthwise convolution followed by a pixel shuffle:
it equals `F.interpolate(mode="bicubic", align_corners=False)` to float rounding, and it exports to
ONNX as Pad(edge) + Conv + DepthToSpace, all of which TensorRT parses (a cubic Resize is not in
TensorRT's documented operator table).
"""

from __future__ import annotations

import functools
import math

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
def _phase_kernel(scale: int) -> tuple[tuple[float, ...], ...]:
    """[scale*scale, 25] 2-D weights: output phase (p, q) reads the 5x5 input pixels around it.

    Kept as plain floats: a cached tensor could be a fake tensor captured while tracing an export.
    """
    taps = [[0.0] * 5 for _ in range(scale)]
    for p in range(scale):
        x = (p + 0.5) / scale - 0.5  # source coordinate relative to input pixel i (half-pixel centres)
        base = math.floor(x)
        for offset in range(-1, 3):  # the 4 cubic neighbours base-1 .. base+2
            taps[p][base + offset + 2] += _cubic(offset - (x - base))
    return tuple(tuple(taps[p][i] * taps[q][j] for i in range(5) for j in range(5)) for p in range(scale) for q in range(scale))


def _kernel(scale: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(_phase_kernel(scale), dtype=dtype, device=device).reshape(scale * scale, 1, 5, 5)


# On a GPU the kernel is made once: a CUDA graph cannot capture the host-to-device copy. Elsewhere it is made per
# call, since a cached tensor could be a fake tensor captured while tracing an export.
_device_kernel = functools.cache(_kernel)


def upsample_bicubic(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic x`scale` upsampling of [N, C, h, w] as one depthwise conv and a pixel shuffle."""
    c = x.shape[1]
    kernel = (_device_kernel if x.device.type == "cuda" else _kernel)(scale, x.dtype, x.device)
    kernel = kernel.repeat(c, 1, 1, 1)  # [c*s*s, 1, 5, 5], groups=c
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    phases = F.conv2d(padded, kernel, groups=c)
    return F.pixel_shuffle(phases, scale)


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR frame a receiver gets: average pooling by `scale`."""
    return F.avg_pool2d(x, scale)


def synthesize_lr(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The paper's LR input: downsample by `scale`, then bicubically upsample back to the HR size."""
    return upsample_bicubic(downsample(x, scale), scale)

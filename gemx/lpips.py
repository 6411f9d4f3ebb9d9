"""LPIPS (Zhang et al. 2018, VGG variant) from a user-supplied weights file.

No weights can be downloaded at run time, so `gemx eval --lpips-weights FILE` takes one state dict
holding both the VGG-16 backbone (torchvision layout, keys `features.N.weight/bias`) and the LPIPS
linear heads (the `lpips` package layout, keys `lin{0..4}.model.1.weight`). Lower is better.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gemx.errors import GemxError
from gemx.vgg import VGG16, load_features, read_weights, vgg_features

_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    def __init__(self, weights: Path):
        super().__init__()
        self.features = vgg_features(VGG16)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        state = read_weights(weights, "LPIPS weights")
        try:
            load_features(self.features, state)
            for i, lin in enumerate(self.lins):
                lin.weight.data.copy_(state[f"lin{i}.model.1.weight"])
        except (RuntimeError, KeyError) as e:
            raise GemxError(f"{weights} is not an LPIPS-VGG weights file (VGG-16 `features.*` + `lin0..4`): "
                            f"{str(e).splitlines()[0]}") from None
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out = (x * 2 - 1 - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance of [N, 3, H, W] images in [0, 1]."""
        return sum(lin((a - b) ** 2).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, self._taps(x), self._taps(y), strict=True))

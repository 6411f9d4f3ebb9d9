"""Training losses: L1 plus a perceptual term.

The paper uses L1 + VGG feature matching. Pretrained VGG weights cannot be downloaded at run time,
so the VGG term runs only when the user supplies a VGG-19 weights file (torchvision's
`vgg19` state dict layout); otherwise the perceptual term is 1 - SSIM.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gemx.errors import GemxError
from gemx.metrics import ssim
from gemx.vgg import VGG19_TO_RELU4_1, load_features, read_weights, vgg_features

_MATCHED = (1, 6, 11, 20)  # relu1_1, relu2_1, relu3_1, relu4_1 in torchvision's vgg19 `features`


class VGGFeatures(nn.Module):
    def __init__(self, weights: Path):
        super().__init__()
        self.features = vgg_features(VGG19_TO_RELU4_1)
        state = read_weights(weights, "VGG weights")
        try:
            load_features(self.features, state)
        except RuntimeError as e:
            raise GemxError(f"{weights} is not a torchvision VGG-19 state dict ({str(e).splitlines()[0]})") from None
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[None, :, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out = (x - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _MATCHED:
                out.append(x)
        return out


class SuperResolutionLoss(nn.Module):
    def __init__(self, vgg_weights: Path | None = None, perceptual_weight: float = 0.2):
        super().__init__()
        self.vgg = VGGFeatures(vgg_weights) if vgg_weights else None
        self.weight = perceptual_weight

    @property
    def description(self) -> str:
        return f"L1 + {self.weight} x " + ("VGG-19 feature matching" if self.vgg else "(1 - SSIM)")

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1 = F.l1_loss(pred, target)
        if self.vgg is None:
            return l1 + self.weight * (1 - ssim(pred, target).mean())
        fp, ft = self.vgg(pred), self.vgg(target)
        return l1 + self.weight * sum(F.l1_loss(a, b) for a, b in zip(fp, ft, strict=True))

"""VGG feature stacks in torchvision's `features` layout, for the perceptual loss and LPIPS.

Weights are never downloaded: callers pass a state dict the user supplied.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gemx.errors import GemxError

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG19_TO_RELU4_1 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512)


def vgg_features(layout: tuple) -> nn.Sequential:
    """conv3x3+ReLU per number, 2x2 max-pool per "M": indices match torchvision's `vgg.features`."""
    layers, cin = [], 3
    for v in layout:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


def load_features(features: nn.Sequential, state: dict[str, torch.Tensor]) -> None:
    """Load the `features.*` entries of a torchvision VGG state dict (extra layers are ignored)."""
    own = {k for k in features.state_dict()}
    features.load_state_dict({k: v for k, v in ((k.removeprefix("features."), v) for k, v in state.items()
                                                if k.startswith("features.")) if k in own})


def read_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A user-supplied state dict, loaded without unpickling code; any failure is one clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GemxError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

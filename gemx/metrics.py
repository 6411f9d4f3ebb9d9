"""Image quality metrics as the paper reports them: PSNR, SSIM in dB, percentiles."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, 11x11 Gaussian, sigma 1.5) of [N, C, H, W] images in [0, 1]."""
    c = x.shape[1]
    w = _gaussian_window().to(x)[None, None].repeat(c, 1, 1, 1)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    var_x = F.conv2d(x * x, w, groups=c) - mu_x**2
    var_y = F.conv2d(y * y, w, groups=c) - mu_y**2
    cov = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [N, C, H, W] images in [0, 1]."""
    mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two whole arrays in [0, 1] (numpy, float64; inf when equal): how a graph's output compares."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else -10 * math.log10(mse)


def ssim_db(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM as the paper reports it: -10 log10(1 - SSIM)."""
    return -10 * torch.log10((1 - ssim(x, y)).clamp_min(1e-10))


def summarize(values: list[float], higher_is_better: bool = True) -> dict[str, float]:
    """Mean and the bad-tail percentiles: 5th/1st for PSNR-like metrics, 95th/99th for LPIPS-like."""
    a = np.asarray(values, dtype=float)
    if not len(a):
        return {"mean": math.nan}
    if higher_is_better:
        return {"mean": float(a.mean()), "p5": float(np.percentile(a, 5)), "p1": float(np.percentile(a, 1))}
    return {"mean": float(a.mean()), "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99))}

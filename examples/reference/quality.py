"""Video quality metrics against a reference video: PSNR, SSIM and MS-GMSD, on videos in [-1, 1].

Used by the demo (examples/generate.py) and the end-to-end benchmark (benchmarks/e2e/).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adacache_fx.calibration.quality import ms_gmsd as _ms_gmsd_per_sample


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1], measured on [0, 1]; inf when identical."""
    mse = F.mse_loss((a.double() + 1) / 2, (b.double() + 1) / 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (11x11 Gaussian window, sigma 1.5, no padding) over videos ``(B, C, F, H, W)``
    in [-1, 1], each frame and channel a separate image."""
    x = ((a.double() + 1) / 2).permute(0, 2, 1, 3, 4).flatten(0, 2)[:, None]  # (B*F*C, 1, H, W)
    y = ((b.double() + 1) / 2).permute(0, 2, 1, 3, 4).flatten(0, 2)[:, None]
    k = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(k**2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]
    mx, my = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mx**2
    syy = F.conv2d(y * y, win) - my**2
    sxy = F.conv2d(x * y, win) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean().item()


def ms_gmsd(a: torch.Tensor, b: torch.Tensor) -> float:
    """MS-GMSD (``adacache_fx.calibration.quality``: perceptual, lower = closer, 0 when identical)
    of videos ``(B, C, F, H, W)`` or images in [-1, 1], measured on [0, 1]; the mean over the batch."""
    return _ms_gmsd_per_sample((a.double() + 1) / 2, (b.double() + 1) / 2, data_range=1.0).mean().item()


def motion_level(video: torch.Tensor) -> float:
    """Mean absolute frame-to-frame change of a video ``(C, F, H, W)`` or ``(B, C, F, H, W)``
    in [-1, 1], on the [0, 1] scale: 0 for a still video."""
    v = (video.double() + 1) / 2
    return (v[..., 1:, :, :] - v[..., :-1, :, :]).abs().mean().item()

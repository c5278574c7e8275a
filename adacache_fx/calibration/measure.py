"""MS-GMSD of a generation's output against its uncached one, for ``calibrate``.

``sample(i)`` returns whatever the user's pipeline returns (decoded frames in several layouts,
or latents), so the output is first read as a batch of images (``as_images``) and put on a
common scale before :func:`quality.ms_gmsd` scores it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .quality import MIN_SIDE, ms_gmsd


def as_images(v: torch.Tensor) -> Optional[torch.Tensor]:
    """``v`` as images ``(N, C, H, W)`` or videos ``(B, 3, F, H, W)``, the first rule that fits:

    1. ``(B, 3, F, H, W)``: RGB videos, channels first (this library's and the reference model's);
    2. ``(..., 3, H, W)``: RGB images or frames, channels first (diffusers' ``output_type="pt"``);
    3. ``(..., H, W, 3)``: RGB, channels last (diffusers' ``"np"``);
    4. anything else of 2 or more dims: each ``(H, W)`` slice a grey image (latents).

    None when H or W is below ``MIN_SIDE`` (the metric's four scales need 17 pixels)."""
    if v.dim() < 2:
        return None
    if v.dim() == 5 and v.shape[1] == 3:
        images = v
    elif v.dim() >= 3 and v.shape[-3] == 3:
        images = v.reshape(-1, 3, *v.shape[-2:])
    elif v.dim() >= 3 and v.shape[-1] == 3:
        images = v.reshape(-1, *v.shape[-3:]).permute(0, 3, 1, 2)
    else:
        images = v.reshape(-1, 1, *v.shape[-2:])
    return images if min(images.shape[-2:]) >= MIN_SIDE and images.numel() else None


def output_ms_gmsd(out: torch.Tensor, ref: torch.Tensor, data_range: Optional[float]) -> Optional[float]:
    """Mean MS-GMSD of ``out`` against ``ref`` (same shape), None if they are not images (``as_images``).

    Both are shifted by the reference's minimum and measured over ``data_range`` (default the
    reference's max - min): the metric's constants assume pixels in ``[0, data_range]``, and the
    shift keeps latents or [-1, 1] videos there."""
    images, reference = as_images(out), as_images(ref)
    if images is None or reference is None:
        return None
    lo = float(reference.min())
    peak = float(data_range) if data_range is not None else float(reference.max()) - lo or 1.0
    return ms_gmsd(images.double() - lo, reference.double() - lo, data_range=peak).mean().item()

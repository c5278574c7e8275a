"""MS-GMSD: a perceptual full-reference distance between a cached output and its uncached one.

What it measures: at four scales (halving the resolution each time) the per-pixel similarity of
the two images' gradient magnitudes (edges, texture, structure), and how unevenly that
similarity is spread over the image: its standard deviation (a uniform small loss is barely
visible, a loss concentrated in some regions is). The scales are weighted as the eye's contrast
sensitivity, and for colour images a chromatic term (the RMS difference of the YIQ colour
channels I and Q) is mixed in where the structural distance is small. 0 for identical images,
larger for further apart (about 0.19 between two unrelated uniform-noise RGB images).

Zhang, Zhang & Mou, "Gradient magnitude similarity deviation on multiple scales for color image
quality assessment", ICASSP 2017 (https://doi.org/10.1109/ICASSP.2017.7952357). The constants,
scale weights, colour handling and pixel conventions are those of piq's ``multi_scale_gmsd`` with
``chromatic=True`` for 3 channels (``chromatic=False`` for 1), so its numbers are comparable.

Why this metric: PSNR counts every pixel error alike and SSIM mostly local contrast; caching
errors often sit along moving edges, which gradient similarity weighs as the eye does. The paper
reports it tracking human opinion scores on standard image-quality databases, and it is a few
convolutions in torch: no new dependency (VMAF, the usual video choice, needs a native package
and a model file).
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

SCALE_WEIGHTS = (0.096, 0.596, 0.289, 0.019)   # finest to coarsest, from the paper
MIN_SIDE = 2 ** len(SCALE_WEIGHTS) + 1         # 17: the smallest height and width accepted (as piq)
STABILITY = 170.0        # the similarity's constant T, for pixel values on the 0..255 scale
MASKING = 0.5            # alpha: discounts the product of the two gradient magnitudes
CHROMA_WEIGHT = 0.01     # beta1: weight of the chromatic RMS difference
GAMMA_OFFSET = 0.32      # beta2 and beta3 shape gamma, the share of the structural term:
GAMMA_RATE = 15.0        # gamma = 2 / (1 + beta2 exp(-beta3 d)) - 1 rises with the distance d
RGB_TO_YIQ = ((0.299, 0.587, 0.114),        # Y: luma (the structural term uses it alone)
              (0.5959, -0.2746, -0.3213),   # I
              (0.2115, -0.5227, 0.3112))    # Q
IMAGES_PER_CHUNK = 64    # images converted to float64 at a time: bounds the memory of long videos


def ms_gmsd(a: torch.Tensor, b: torch.Tensor, data_range: Union[int, float] = 1.0) -> torch.Tensor:
    """MS-GMSD of ``a`` against ``b`` per sample: a float64 tensor ``(B,)``, 0 where identical.

    ``a``, ``b``: images ``(B, C, H, W)`` or videos ``(B, C, F, H, W)`` of the same shape, with
    C = 1 (grey) or 3 (RGB), values in ``[0, data_range]`` (videos in [-1, 1]: pass ``(v + 1) / 2``
    and ``data_range=1``). Each frame is scored as an image and a video's score is the mean over its
    frames. H and W must be at least ``MIN_SIDE`` (17). Computed in float64 whatever the dtype.
    Symmetric: ``ms_gmsd(a, b) == ms_gmsd(b, a)``. NaN in the input gives NaN."""
    _check(a, b, data_range)
    x, y = _as_images(a), _as_images(b)
    frames = a.shape[2] if a.dim() == 5 else 1
    scores = torch.cat([_score(x[i:i + IMAGES_PER_CHUNK], y[i:i + IMAGES_PER_CHUNK], float(data_range))
                        for i in range(0, x.shape[0], IMAGES_PER_CHUNK)])
    return scores.view(a.shape[0], frames).mean(dim=1)


def _check(a, b, data_range) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_gmsd: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"ms_gmsd: {name} is complex ({t.dtype}); give real images")
    if a.shape != b.shape:
        raise ValueError(f"ms_gmsd: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() not in (4, 5):
        raise ValueError(f"ms_gmsd: expected images (B, C, H, W) or videos (B, C, F, H, W), got shape {tuple(a.shape)}")
    if a.shape[1] not in (1, 3):
        raise ValueError(f"ms_gmsd: expected 1 (grey) or 3 (RGB) channels at dim 1, got {a.shape[1]} "
                         f"(shape {tuple(a.shape)})")
    if a.numel() == 0:
        raise ValueError(f"ms_gmsd: empty input, shape {tuple(a.shape)}")
    if min(a.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"ms_gmsd: height and width must be at least {MIN_SIDE} pixels for {len(SCALE_WEIGHTS)} "
                         f"scales, got {tuple(a.shape[-2:])}")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not (
            math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"ms_gmsd: data_range must be a positive finite number, got {data_range!r}")


def _as_images(v: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` as is, ``(B, C, F, H, W)`` as ``(B * F, C, H, W)`` (sample-major)."""
    if v.dim() == 4:
        return v
    n, c, f, h, w = v.shape
    return v.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)


def _score(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """MS-GMSD of each image pair ``(N, C, H, W)``: ``(N,)`` float64."""
    x = x.to(torch.float64) * (255.0 / data_range)   # the constants are for the 0..255 scale
    y = y.to(torch.float64) * (255.0 / data_range)
    colour = x.shape[1] == 3
    if colour:
        x, y = _yiq(x), _yiq(y)
    deviations = []
    for scale in range(len(SCALE_WEIGHTS)):
        if scale > 0:
            x, y = _halve(x), _halve(y)
        deviations.append(_gmsd(x[:, :1], y[:, :1]))
    weights = torch.tensor(SCALE_WEIGHTS, dtype=torch.float64, device=x.device)
    structural = (weights * torch.stack(deviations, dim=1) ** 2).sum(dim=1).sqrt()
    if not colour:
        return structural
    # chromatic term at the coarsest scale, where the loop left x and y (piq's convention)
    chroma = ((x[:, 1:] - y[:, 1:]) ** 2).mean(dim=(2, 3)).sum(dim=1).sqrt()
    gamma = 2 / (1 + GAMMA_OFFSET * torch.exp(-GAMMA_RATE * structural)) - 1
    return gamma * structural + (1 - gamma) * CHROMA_WEIGHT * chroma


def _yiq(rgb: torch.Tensor) -> torch.Tensor:
    matrix = torch.tensor(RGB_TO_YIQ, dtype=rgb.dtype, device=rgb.device)
    return torch.einsum("kc,nchw->nkhw", matrix, rgb)


def _halve(v: torch.Tensor) -> torch.Tensor:
    """2x2 mean and stride 2; an odd side first gets one zero row and column at the bottom and
    right (both, as piq pads: by the larger of the two remainders)."""
    pad = max(v.shape[2] % 2, v.shape[3] % 2)
    return F.avg_pool2d(F.pad(v, (0, pad, 0, pad)), kernel_size=2)


def _gmsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GMSD of grey images ``(N, 1, H, W)``: the standard deviation over the pixels of the
    gradient magnitude similarity (Prewitt gradients, zero padding, masked as in the paper)."""
    prewitt = torch.tensor([[-1.0, 0.0, 1.0]] * 3, dtype=x.dtype, device=x.device) / 3
    kernels = torch.stack([prewitt, prewitt.T])[:, None]   # d/dx, d/dy: (2, 1, 3, 3)
    gx = F.conv2d(x, kernels, padding=1).pow(2).sum(dim=1).sqrt()
    gy = F.conv2d(y, kernels, padding=1).pow(2).sum(dim=1).sqrt()
    product = gx * gy
    similarity = (2 * product - MASKING * product + STABILITY) / (gx ** 2 + gy ** 2 - MASKING * product + STABILITY)
    return similarity.flatten(1).std(dim=1, unbiased=False)

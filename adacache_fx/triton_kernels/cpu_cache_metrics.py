"""CPU implementation of the fused cache metrics (same semantics as the Triton kernel)."""

from __future__ import annotations

import torch
from torch import Tensor


def cache_metrics_cpu(r: Tensor, p: Tensor, frame_stride: int = 1) -> Tensor:
    from .cache_metrics import cache_metrics_torch

    return cache_metrics_torch(r, p, frame_stride)

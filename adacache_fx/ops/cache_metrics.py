"""``adacache_fx::cache_metrics``: the AdaCache distance and MoReg motion partial sums.

``r`` (probe residual of this computed step) and ``p`` (probe residual of the previous
computed step) have the same shape ``(B, F, *E)``: a batch-like axis, the frame axis,
then element axes. For each sample ``b`` the op returns five float32 partial sums::

    out[b, 0] = sum |r[b] - p[b]|                         # AdaCache distance numerator
    out[b, 1] = sum |p[b]|                                # AdaCache distance denominator
    out[b, 2] = sum |r[b, s:] - r[b, :-s]|                # MoReg numerator
    out[b, 3] = sum |r[b, s:]|                            # MoReg denominator, part 1
    out[b, 4] = sum |r[b, :-s]|                           # MoReg denominator, part 2

with ``s = frame_stride``. With fewer than ``s + 1`` frames (images) the motion sums are
exactly 0. Accumulation is in float32 for every input dtype; NaN and Inf propagate.

One op, three pieces: ``_validate`` (once, in :func:`fused_cache_metrics`), the torch
composite :func:`cache_metrics_torch` (CPU and every other device; also the fake), and on
CUDA the single-pass Triton kernel of ``triton_kernels/cache_metrics.py``, imported only there.
CUDA without triton installed runs the composite. The backends agree to float32
rounding, not bitwise: every rank of one job runs the same one (same device type).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._compat import triton_installed

from .metric_layout import NUM_METRICS
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(r: Tensor, p: Tensor, frame_stride: int) -> None:
    if not isinstance(r, Tensor) or not isinstance(p, Tensor):
        raise TypeError(f"fused_cache_metrics: r and p must be torch.Tensor, got {type(r).__name__} "
                        f"and {type(p).__name__}")
    if isinstance(frame_stride, bool) or not isinstance(frame_stride, int):
        raise TypeError(f"fused_cache_metrics: frame_stride must be an int, got {type(frame_stride).__name__}")
    if frame_stride < 1:
        raise ValueError(f"fused_cache_metrics: frame_stride must be >= 1, got {frame_stride}")
    if r.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused_cache_metrics: r has dtype {r.dtype}; supported dtypes are "
                        "torch.float32, torch.bfloat16 and torch.float16")
    if p.dtype != r.dtype:
        raise TypeError(f"fused_cache_metrics: r and p must have the same dtype, got r {r.dtype} and p {p.dtype}")
    if r.dim() < 3:
        raise ValueError("fused_cache_metrics: r must have shape (B, F, N) (or (B, F, S, C)), got a "
                         f"{r.dim()}-d tensor of shape {tuple(r.shape)}; add the missing axes with "
                         "unsqueeze (an image is F = 1)")
    if p.shape != r.shape:
        raise ValueError(f"fused_cache_metrics: r and p must have the same shape, got r {tuple(r.shape)} "
                         f"and p {tuple(p.shape)}")
    if p.device != r.device:
        raise ValueError(f"fused_cache_metrics: r and p must be on the same device, got r on {r.device} "
                         f"and p on {p.device}")


# Elements of one (B, F, chunk) slab: a few MB of float32 temporaries stay in cache, which makes
# the composite 5-10x faster on CPU than whole-tensor passes (measured, benchmarks/results/kernels_cpu.md).
_CHUNK_ELEMENTS = 1 << 19


def cache_metrics_torch(r: Tensor, p: Tensor, frame_stride: int = 1) -> Tensor:
    """The torch composite: float32 ``(B, 5)``, accumulated in float32, over chunks of the
    element axis (each chunk's partial sums added in order: deterministic)."""
    s = frame_stride
    B, F, N = r.shape[0], r.shape[1], math.prod(r.shape[2:])
    r, p = r.reshape(B, F, N), p.reshape(B, F, N)
    out = torch.zeros(B, NUM_METRICS, dtype=torch.float32, device=r.device)
    chunk = max(1024, _CHUNK_ELEMENTS // max(1, B * F))
    for start in range(0, N, chunk):
        rf = r[:, :, start:start + chunk].to(torch.float32)   # may alias r: no in-place ops on rf / pf
        pf = p[:, :, start:start + chunk].to(torch.float32)
        out[:, 0] += (rf - pf).abs_().sum(dim=(1, 2))
        out[:, 1] += pf.abs().sum(dim=(1, 2))
        if F >= s + 1:
            magnitude = rf.abs()
            out[:, 2] += (rf[:, s:] - rf[:, :-s]).abs_().sum(dim=(1, 2))
            out[:, 3] += magnitude[:, s:].sum(dim=(1, 2))
            out[:, 4] += magnitude[:, :-s].sum(dim=(1, 2))
    return out


def cache_metrics_reference(r: Tensor, p: Tensor, frame_stride: int = 1) -> Tensor:
    """float64 ``(B, 5)`` reference of the op, the five sums written out as separate passes (as
    the public AdaCache code computes them): what tests and benchmarks check every backend against."""
    s = frame_stride
    B, F = r.shape[0], r.shape[1]
    r64 = r.to(torch.float64).reshape(B, F, -1)
    p64 = p.to(torch.float64).reshape(B, F, -1)
    out = torch.zeros(B, NUM_METRICS, dtype=torch.float64, device=r.device)
    out[:, 0] = (r64 - p64).abs().sum(dim=(1, 2))
    out[:, 1] = p64.abs().sum(dim=(1, 2))
    if F >= s + 1:
        hi, lo = r64[:, s:], r64[:, :-s]
        out[:, 2] = (hi - lo).abs().sum(dim=(1, 2))
        out[:, 3] = hi.abs().sum(dim=(1, 2))
        out[:, 4] = lo.abs().sum(dim=(1, 2))
    return out


@torch.library.custom_op("adacache_fx::cache_metrics", mutates_args=())
def _cache_metrics_op(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
    return cache_metrics_torch(r, p, frame_stride)


@_cache_metrics_op.register_kernel("cuda")
def _cache_metrics_cuda(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
    if not triton_installed():
        return cache_metrics_torch(r, p, frame_stride)
    try:
        from ..triton_kernels.cache_metrics import cache_metrics_triton
    except ImportError as exc:
        raise ImportError(f"adacache_fx: triton is installed but does not import ({exc}); fix the install, "
                          "or uninstall triton to run the torch composite on CUDA") from exc
    return cache_metrics_triton(r, p, frame_stride)


@_cache_metrics_op.register_fake
def _(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
    return r.new_empty((r.shape[0], NUM_METRICS), dtype=torch.float32)


def fused_cache_metrics(r: Tensor, p: Tensor, frame_stride: int = 1) -> Tensor:
    """Per-sample partial sums ``(B, 5)`` float32 for the distance and the motion score
    (see the module docstring); sum over dim 0 for whole-batch norms. Any strides;
    fp32/bf16/fp16. Calls ``torch.ops.adacache_fx.cache_metrics`` (traceable, no graph break)."""
    _validate(r, p, frame_stride)
    return torch.ops.adacache_fx.cache_metrics(r, p, frame_stride)

"""Fused kernels of adacache-fx (Triton on CUDA, CPU implementations with the same semantics).

Triton is optional: without it the CPU path and a CUDA torch fallback still work.
"""

from .cache_metrics import (
    HAS_TRITON,
    NUM_METRICS,
    cache_metrics_reference,
    cache_metrics_torch,
    cache_metrics_triton,
    fused_cache_metrics,
    triton_launch_config,
)

__all__ = [
    "HAS_TRITON",
    "NUM_METRICS",
    "cache_metrics_reference",
    "cache_metrics_torch",
    "cache_metrics_triton",
    "fused_cache_metrics",
    "triton_launch_config",
]

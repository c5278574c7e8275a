"""Custom ops of adacache-fx (one op per module)."""
from .cache_metrics import NUM_METRICS, cache_metrics_reference, cache_metrics_torch, fused_cache_metrics

__all__ = ["NUM_METRICS", "cache_metrics_reference", "cache_metrics_torch", "fused_cache_metrics"]

"""The layout of the metric op's output, shared by every implementation of it (the torch
composite, the float64 reference and the Triton kernel): five float32 partial sums per sample,
in the order ``ops/cache_metrics.py`` documents."""
NUM_METRICS = 5

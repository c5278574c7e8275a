"""Forecast reuse (``config.reuse``): what a reused step adds, from the last computed deltas.

``constant`` adds the last computed step's deltas unchanged (the paper); ``linear`` extrapolates
each delta in the sampler's variable from the last two computed steps; ``damped`` scales that
extrapolation by ``reuse_damping``. A forecast keeps two tensors per stream (the deltas and their
change): O(1) in the number of steps. Shared by the graph-level guard (``CachedGraph``) and the
module-level one (``ModuleBlockGuard``).
"""
from __future__ import annotations

import torch


def forecast_slopes(config, cache, deltas: list, time: float, generation: int, scheduler) -> tuple:
    """``(slopes, span)``: ``delta - previous delta`` per stream and the variable's change between
    the two computed steps, when the previous computed step's deltas are in ``cache`` (same
    generation, same shapes); ``(None, 0.0)`` otherwise. Replaces ``cache``'s own slopes."""
    if config.reuse == "constant" or cache is None or cache.generation != generation:
        return None, 0.0
    if len(scheduler.computed_steps) < 2 or cache.step != scheduler.computed_steps[-2] or time == cache.time:
        return None, 0.0
    slopes = []
    for new, old in zip(deltas, cache.deltas):
        if len(new) != len(old) or any(a.shape != b.shape for a, b in zip(new, old)):
            return None, 0.0
        slopes.append([a - b for a, b in zip(new, old)])
    return slopes, time - cache.time


def forecast_deltas(config, cache, time: float) -> list:
    """What a reused step at ``time`` adds: the cached deltas, or their forecast."""
    if config.reuse == "constant" or cache.slopes is None:
        return cache.deltas
    scale = (time - cache.time) / cache.slope_span
    if config.reuse == "damped":
        scale *= config.reuse_damping
    return [[torch.add(d, slope, alpha=scale) for d, slope in zip(region, slopes)]
            for region, slopes in zip(cache.deltas, cache.slopes)]


def previous_probe_due(cache, decision, scheduler) -> bool:
    """Whether a scheduled computed step has the previous computed step's probe in ``cache``
    to measure its distance against (the first computed step of a generation has none)."""
    return (decision.compute and cache is not None and cache.probe is not None
            and cache.generation == decision.generation and len(scheduler.computed_steps) >= 2
            and cache.step == scheduler.computed_steps[-2])

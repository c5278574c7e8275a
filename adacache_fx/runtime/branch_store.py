"""The branch store: per model instance and guidance branch, what the last computed step left
(one delta per stream, the probe, the forecast terms), and how a computed step is stored.

One store per guard: the graph-level guard (``cached_graph.py``), its per-sample calls
(``per_sample_calls.py``) and the block-list guard (``module_guard.py``) all keep their caches
here and store a computed step the same way:

1. the metric: when the schedule computes a step and the previous computed step's probe is in
   the cache, the fused op's five partial sums between the two probes (each guard gives its own
   probe view: the frame axis it knows) go to the schedule, pooled over the branches;
2. the calibration record (``adacache_fx.calibrate`` records uncached generations);
3. the forecast terms (``forecasters/``), when the previous computed step's deltas are in the
   cache (same generation, same shapes, another sampler time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ops import fused_cache_metrics
from .forecasters import apply_forecast, make_forecaster


def cache_bytes(deltas: list, terms: Optional[list], probe: Optional[torch.Tensor]) -> int:
    """Bytes a branch's cache holds: its deltas, forecast terms and probe."""
    tensors = [d for region in deltas for d in region]
    tensors += [t for region in (terms or []) for stream in region for t in stream]
    if probe is not None:
        tensors.append(probe)
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class BranchCache:
    """What one guidance branch keeps between steps."""

    generation: int
    step: int                       # the computed step the deltas belong to
    deltas: list                    # per region: [delta per stream]
    stream_shapes: list             # shapes of the graph's activation inputs when cached
    probe: Optional[torch.Tensor]   # probe residual at ``step`` (None: no metric next time)
    time: float = 0.0               # the sampler's variable at ``step`` (timestep, else step index)
    terms: Optional[list] = None    # forecast: per region, per stream, [term tensors] (None: the deltas alone)
    span: float = 0.0               # the variable's change between the two computed steps behind the terms

    def nbytes(self) -> int:
        return cache_bytes(self.deltas, self.terms, self.probe)


@dataclass
class SampleCache:
    """What one guidance branch keeps between steps, for a batch of samples each on its own schedule."""

    generation: int
    deltas: list                    # per region: [delta per stream], every row
    stream_shapes: list
    probe: Optional[torch.Tensor]   # every row: each sample's at its own last computed step
    steps: list                     # per sample: the computed step its rows' deltas belong to
    times: list                     # per sample: the sampler's variable at that step
    terms: Optional[list] = None    # forecast: per region, per stream, [term tensors], every row
    spans: Optional[list] = None    # per sample: the variable's change behind its term rows (0: none)

    def nbytes(self) -> int:
        return cache_bytes(self.deltas, self.terms, self.probe)


def previous_probe_due(cache, decision, scheduler) -> bool:
    """Whether a scheduled computed step has the previous computed step's probe in ``cache``
    to measure its distance against (the first computed step of a generation has none)."""
    return (decision.compute and cache is not None and cache.probe is not None
            and cache.generation == decision.generation and len(scheduler.computed_steps) >= 2
            and cache.step == scheduler.computed_steps[-2])


def same_shapes(new: list, old: list) -> bool:
    """Two per-region lists of stream tensors of the same shapes."""
    return len(new) == len(old) and all(len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
                                        for a, b in zip(new, old))


class BranchStore:
    """The caches of one guard, per model instance (``instance``) and guidance branch."""

    def __init__(self, runtime, owner: object):
        self.runtime = runtime
        self.owner = owner                  # the guard: its id keys the calibration record
        self._instances: list = []          # per instance: {branch: BranchCache or SampleCache}
        self._forecaster = None

    # ----- the caches --------------------------------------------------------------------------
    def branches(self, instance: int = 0) -> dict:
        while len(self._instances) <= instance:
            self._instances.append({})
        return self._instances[instance]

    def reset(self) -> None:
        for branches in self._instances:
            branches.clear()

    def nbytes(self, instance: Optional[int] = None) -> int:
        groups = self._instances if instance is None else self._instances[instance:instance + 1]
        return sum(c.nbytes() for branches in groups for c in branches.values())

    @property
    def forecaster(self):
        """The forecaster of the runtime's config (made again when ``set_config`` changed it)."""
        config = self.runtime.config
        if self._forecaster is None or self._forecaster.config is not config:
            self._forecaster = make_forecaster(config)
        return self._forecaster

    # ----- a reused step -----------------------------------------------------------------------
    def coefficients(self, cache: BranchCache, time: float) -> Optional[tuple]:
        """The forecast's coefficients at ``time`` (None: the cache has no terms; add the deltas)."""
        if cache.terms is None:
            return None
        return self.forecaster.coefficients(time, cache.time, cache.span)

    def reused_deltas(self, cache: BranchCache, time: float) -> list:
        """What a reused step at ``time`` adds to each stream: the cached deltas, or their forecast."""
        coefficients = self.coefficients(cache, time)
        if coefficients is None:
            return cache.deltas
        return [[apply_forecast(d, terms, coefficients) for d, terms in zip(region, region_terms)]
                for region, region_terms in zip(cache.deltas, cache.terms)]

    # ----- a computed step ---------------------------------------------------------------------
    def measure(self, scheduler, current: torch.Tensor, previous: torch.Tensor, has_frames: bool,
                boundary: Optional[Callable] = None) -> None:
        """The metric's sums between two probe views (``(B, frames, inner)``), summed over the
        batch, to the schedule. ``boundary(sums, current, has_frames) -> (sums, has_frames)`` adds
        what a shard of the frames misses (sequence parallelism)."""
        if current.shape != previous.shape:
            return
        sums = fused_cache_metrics(current, previous, self.runtime.config.moreg_stride).sum(0)
        if boundary is not None and has_frames:
            sums, has_frames = boundary(sums, current, has_frames)
        scheduler.add_metric_sums(sums, has_motion=has_frames)

    def record(self, branch: int, step: int, view: torch.Tensor, has_frames: bool) -> None:
        """The probe of an uncached generation's step, for ``adacache_fx.calibrate``."""
        recorder = self.runtime.recorder
        if recorder is not None:
            recorder.record((id(self.owner), branch), step, view, self.runtime.config.moreg_stride, has_frames)

    def forecast_terms(self, previous, deltas: list, time: float, generation: int, scheduler) -> tuple:
        """``(terms, span)`` of a computed step whose deltas are ``deltas``, when the previous
        computed step's deltas are in ``previous`` (same generation, same shapes, another
        sampler time); ``(None, 0.0)`` otherwise."""
        forecaster = self.forecaster
        if not forecaster.terms or previous is None or previous.generation != generation:
            return None, 0.0
        if len(scheduler.computed_steps) < 2 or previous.step != scheduler.computed_steps[-2] or time == previous.time:
            return None, 0.0
        if not same_shapes(deltas, previous.deltas):
            return None, 0.0
        terms = [[forecaster.stream_terms(new, old) for new, old in zip(region, old_region)]
                 for region, old_region in zip(deltas, previous.deltas)]
        return terms, time - previous.time

    def store(self, scheduler, decision, previous: Optional[BranchCache], deltas: list,
              probe: Optional[torch.Tensor], view: Callable, stream_shapes: list,
              boundary: Optional[Callable] = None) -> BranchCache:
        """A computed call's cache: ``deltas`` (per region, per stream) and ``probe``, measured
        against ``previous`` (``view(probe) -> (view, has_frames)``: the guard's probe view)."""
        scheduled = decision.compute
        if scheduler.nothing_to_skip and self.runtime.recorder is None:
            # a few-step generation computes every step: no metric to take, no forecast to keep
            return BranchCache(generation=decision.generation, step=scheduler.last_computed_step, deltas=deltas,
                               stream_shapes=stream_shapes, probe=None, time=scheduler.clock.time)
        if probe is not None and previous_probe_due(previous, decision, scheduler):
            current, has_frames = view(probe)
            before, _ = view(previous.probe)
            self.measure(scheduler, current, before, has_frames, boundary)
        if scheduled and probe is not None and self.runtime.recorder is not None:
            current, has_frames = view(probe)
            self.record(decision.branch, scheduler.clock.step, current, has_frames)
        time = scheduler.clock.time
        terms, span = self.forecast_terms(previous, deltas, time, decision.generation, scheduler)
        return BranchCache(generation=decision.generation, step=scheduler.last_computed_step, deltas=deltas,
                           stream_shapes=stream_shapes, probe=probe.detach() if scheduled and probe is not None else None,
                           time=time, terms=terms, span=span)

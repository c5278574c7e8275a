"""``reuse="linear"`` and ``"damped"``: the delta extrapolated to the current step, first order in
the sampler's variable (the timestep the scheduler reads; the step index for a model without
one), from the deltas of the last two computed steps: ``d1 + r (d1 - d0)``, ``r = (t - t1) /
(t1 - t0)``; ``"damped"`` scales the extrapolation by ``reuse_damping``. One term per stream:
the slope ``d1 - d0``."""
from __future__ import annotations

import torch

from .base import Forecaster
from .registry import register_forecaster


@register_forecaster("linear")
class LinearForecaster(Forecaster):
    terms = 1

    def stream_terms(self, new: torch.Tensor, previous: torch.Tensor) -> list:
        return [new - previous]

    def coefficients(self, time: float, computed_time: float, span: float) -> tuple:
        return ((time - computed_time) / span if span else 0.0,)


@register_forecaster("damped")
class DampedForecaster(LinearForecaster):
    def coefficients(self, time: float, computed_time: float, span: float) -> tuple:
        (scale,) = super().coefficients(time, computed_time, span)
        return (scale * self.config.reuse_damping,)

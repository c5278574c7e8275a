"""``reuse="constant"`` (the paper's code): a reused step adds the last computed delta unchanged."""
from __future__ import annotations

from .base import Forecaster
from .registry import register_forecaster


@register_forecaster("constant")
class ConstantForecaster(Forecaster):
    terms = 0

"""Forecasters by name: ``AdaCacheConfig(reuse=name)`` chooses one.

    @register_forecaster("my_forecast")
    class MyForecast(Forecaster):
        terms = 1
        def stream_terms(self, new, previous): ...
        def coefficients(self, time, computed_time, span): ...

One file per forecaster; the runtime never names one.
"""
from __future__ import annotations

from ..registry import Registry

FORECASTERS = Registry("forecaster", "reuse")
register_forecaster = FORECASTERS.register
registered_forecasters = FORECASTERS.names
forecaster_class = FORECASTERS.get


def make_forecaster(config):
    """The forecaster of ``config.reuse``."""
    return forecaster_class(config.reuse)(config)

"""Forecasters by name: ``AdaCacheConfig(reuse=name)`` chooses one.

    @register_forecaster("my_forecast")
    class MyForecast(Forecaster):
        terms = 1
        def stream_terms(self, new, previous): ...
        def coefficients(self, time, computed_time, span): ...

One file per forecaster; the runtime never names one.
"""
from __future__ import annotations

from ...errors import AdaCacheConfigError

_FORECASTERS: dict = {}


def register_forecaster(name: str):
    """Class decorator: register a :class:`~adacache_fx.runtime.forecasters.base.Forecaster` subclass."""
    def register(cls):
        if name in _FORECASTERS and _FORECASTERS[name] is not cls:
            raise ValueError(f"a forecaster named {name!r} is already registered ({_FORECASTERS[name].__name__})")
        cls.name = name
        _FORECASTERS[name] = cls
        return cls
    return register


def registered_forecasters() -> list:
    return sorted(_FORECASTERS)


def forecaster_class(name: str):
    cls = _FORECASTERS.get(name)
    if cls is None:
        raise AdaCacheConfigError(f"reuse={name!r} is not a registered forecaster (registered: {registered_forecasters()})")
    return cls


def make_forecaster(config):
    """The forecaster of ``config.reuse``."""
    return forecaster_class(config.reuse)(config)

"""Forecast reuse (``AdaCacheConfig.reuse``): what a reused step adds, as ``delta + sum c_i
term_i`` (``base``). Each forecaster is one module registered by name (``registry``). Built in:
``"constant"``, ``"linear"`` (default), ``"damped"``."""
from . import constant, linear  # noqa: F401 - register the built-in forecasters
from .base import Forecaster, apply_forecast
from .registry import forecaster_class, make_forecaster, register_forecaster, registered_forecasters

__all__ = ["Forecaster", "apply_forecast", "forecaster_class", "make_forecaster", "register_forecaster",
           "registered_forecasters"]

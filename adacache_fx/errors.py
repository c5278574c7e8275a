"""The library's errors and warnings, in one module that imports nothing of the library: every
stage (analysis, rewrite, compile, runtime, the entry points) raises and warns with them."""
from __future__ import annotations


class AdaCacheConfigError(ValueError):
    """The config does not fit the model (a probe or timestep input that does not exist,
    no timestep and no ``num_steps``). Raised to the user, not turned into a fallback."""


class AdaCacheWarning(UserWarning):
    """A graph runs uncached (and why), or a requested feature (MoReg, per-sample schedules) is
    off for a model (and why)."""


class AdaCacheSyncWarning(UserWarning):
    """The timestep is read from a device tensor on every call (a host sync per call)."""


def find_in_chain(exc, kind: type):
    """The first exception of type ``kind`` in ``exc``'s chain (Dynamo's ``inner_exception``, then
    ``__cause__`` / ``__context__``), or None: Dynamo wraps the errors raised while it traces."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None

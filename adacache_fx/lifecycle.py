"""Undo what this library installed, whichever entry point installed it."""
from __future__ import annotations

from .compile_model import INSTALLED, uncompile_model
from .integrations import diffusers


def disable(obj) -> None:
    """Undo :func:`adacache_fx.integrations.diffusers.enable` on a pipeline, or
    :func:`adacache_fx.compile_model` on a module: every patched thing is restored (the model's
    call, its blocks' forwards, a pipeline's class and its scheduler's ``step``), so the output is
    the never-compiled model's. Raises ``ValueError`` on an object this library never enabled."""
    if diffusers.backend_of(obj) is not None:
        diffusers.disable(obj)
    elif INSTALLED in getattr(obj, "__dict__", {}):
        uncompile_model(obj)
    else:
        raise ValueError(f"adacache_fx.disable: caching was never enabled on this {type(obj).__name__} "
                         "(enable it with integrations.diffusers.enable(pipe) or compile_model(model))")

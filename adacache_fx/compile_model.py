"""The entry point: compile a model in place with the AdaCache backend, with the ops that
break Dynamo's graph captured into it.

    from adacache_fx import AdaCacheConfig, compile_model
    backend = compile_model(model, AdaCacheConfig.fast(num_steps=30))   # model compiled in place
    out = model(x, t, context)
    print(backend.report(model))

Why an entry point and not only ``torch.compile(model, backend=adacache_backend(...))``: the
backend sees one Dynamo graph at a time, and a model that calls ``.item()`` / ``.tolist()``
(token counts, grid sizes for a rotary embedding) or an op whose output shape depends on the
data (``nonzero``, ``masked_select``, mixture-of-experts routing) breaks Dynamo's graph there
under the default config, often inside every block: no graph then holds a block, and there is
nothing to cache. ``compile_model`` traces each call of this model only under
:func:`adacache_fx.tracing.trace_config`, which captures those ops into the graph (the user's
global Dynamo config and their other compiled models are never changed).

What it cannot capture still breaks the graph: a Python ``if`` or ``for`` on a tensor's value
(``for n in tokens_per_expert:``). Such a model runs as plain ``torch.compile`` would run it,
and the backend's warning names the graph that could not be cached. Where capturing makes
Dynamo fail outright (a guard on a data-dependent size it cannot decide, e.g. ``.tolist()`` of
a slice whose length is itself data-dependent), the call is traced again without capture, as
plain ``torch.compile`` traces it, with an ``AdaCacheWarning``, and so are the model's later calls.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Union

import torch

from .backend import AdaCacheBackend, adacache_backend
from .config import AdaCacheConfig
from .errors import AdaCacheConfigError, AdaCacheWarning
from .runtime.module_guard import ModuleBlockGuard
from .tracing import (capture_failed, data_dependent_capture, frames_parameter, frames_value, mark_batch_dynamic,
                      prepare_hooks_for_tracing, trace_config)

__all__ = ["CompiledModel", "compile_model", "data_dependent_capture", "uncompile_model"]

# The attribute of a model compiled by compile_model that holds its undo record.
INSTALLED = "_adacache_compiled"


class CompiledModel:
    """The undo record of one ``compile_model``: what it changed on the model, and the backend."""

    def __init__(self, model: torch.nn.Module, backend: AdaCacheBackend, guard: Optional[ModuleBlockGuard]):
        self.backend = backend
        self.guard = guard
        self._model = model

    def undo(self) -> None:
        """The model as before ``compile_model``: its own call (``module.compile`` undone) and,
        under the block-list guard, every block's own forward."""
        if self.guard is not None:
            self.guard.uninstall()
        self._model._compiled_call_impl = None
        self._model.__dict__.pop(INSTALLED, None)


def uncompile_model(model: torch.nn.Module) -> None:
    """Undo :func:`compile_model` on ``model``: it runs its own forward again, every patched
    thing restored (the blocks' forwards under ``block_guard="modules"``)."""
    record = model.__dict__.get(INSTALLED)
    if record is None:
        raise ValueError(f"uncompile_model: this {type(model).__name__} was not compiled by compile_model")
    record.undo()


def compile_model(model: torch.nn.Module, config: Optional[AdaCacheConfig] = None, *,
                  inner: Union[str, Callable] = "inductor", mode: Optional[str] = None,
                  options: Optional[dict] = None, capture_data_dependent: bool = True,
                  block_guard: str = "graph", **compile_kwargs) -> AdaCacheBackend:
    """Compile ``model`` in place (``model.compile``: the module keeps its class, attributes and
    state-dict keys) with the AdaCache backend, and return the backend.

    ``capture_data_dependent`` (default True): trace the model's calls under
    :func:`data_dependent_capture`, so that ``.item()``, ``.tolist()`` and ``nonzero``-like ops
    stay inside the graph. ``block_guard``: ``"graph"`` (default) caches the regions the backend
    finds inside Dynamo's graphs; ``"modules"`` guards the block lists at their calls instead, for
    a model whose graph breaks inside every block even with capture (a Python loop over a tensor's
    values): the first call runs eagerly and finds the blocks (``runtime/module_guard.py``), the
    blocks and the rest of the model are compiled by the inner compiler. ``compile_kwargs`` go to
    ``model.compile`` (``dynamic=``, ``fullgraph=``). Raises ``RuntimeError`` when the model is
    already compiled."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_model takes an nn.Module, got {type(model).__name__}")
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise RuntimeError("compile_model: this module is already compiled (module.compile or compile_model was "
                           "called on it); compile it once")
    if block_guard not in ("graph", "modules"):
        raise AdaCacheConfigError(f"compile_model: block_guard must be 'graph' or 'modules', got {block_guard!r}")
    backend = adacache_backend(config, inner=inner, mode=mode, options=options)
    signature = frames_parameter(model, backend.config)
    prepare_hooks_for_tracing(model)
    guard = _module_guard(model, backend, compile_kwargs) if block_guard == "modules" else None
    model.compile(backend=backend if guard is None else backend.inner, **compile_kwargs)
    compiled = model._compiled_call_impl
    capturing = [capture_data_dependent]
    hooks_prepared = [False]

    def run(args, kwargs):
        if not capturing[0]:
            with trace_config(False):
                return compiled(*args, **kwargs)
        try:
            with trace_config(True):
                return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only Dynamo's own tracing failures are retried
            if not capture_failed(exc):
                raise
            capturing[0] = False
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"adacache: tracing {type(model).__name__} with data-dependent ops captured failed "
                          f"({type(exc).__name__}: {first_line}); this model is traced as plain torch.compile "
                          "traces it from now on (its graph breaks at those ops)", AdaCacheWarning, stacklevel=3)
            if guard is not None:
                guard.restart_call()
            with trace_config(False):
                return compiled(*args, **kwargs)

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        # packed video: the frame count is a Python int that Dynamo bakes into the graph, so the
        # analysis of a graph traced by this call reads it here
        frames = frames_value(signature, backend.config.frames_arg, args, kwargs, backend.config.video_frame_dim)
        if backend.config.per_sample:
            mark_batch_dynamic(args, kwargs)
        if not hooks_prepared[0]:   # again at the first call: hooks may be added after compile_model
            prepare_hooks_for_tracing(model)
            hooks_prepared[0] = True
        with backend.traced_call(frames=frames):
            if guard is None:
                return run(args, kwargs)
            if not guard.observed:
                return _observe(model, backend, guard, args, kwargs, frames)
            guard.begin_call(args, kwargs, frames)
            try:
                output = run(args, kwargs)
            except BaseException:
                guard.abort_call()
                raise
            guard.end_call()
            return output

    model._compiled_call_impl = call
    model.__dict__[INSTALLED] = CompiledModel(model, backend, guard)
    return backend


def _module_guard(model: torch.nn.Module, backend: AdaCacheBackend, compile_kwargs: dict):
    """The block-list guard of ``block_guard="modules"``, its blocks compiled by the inner compiler."""
    if backend.config.per_sample:
        raise AdaCacheConfigError("compile_model: per_sample=True needs block_guard='graph' (the module-level "
                                  "guard takes one decision per call)")
    guard = ModuleBlockGuard(model, backend.runtime,
                             lambda forward: torch.compile(forward, backend=backend.inner, **compile_kwargs))
    backend.graphs.append(guard)
    return guard


def _observe(model: torch.nn.Module, backend: AdaCacheBackend, guard, args, kwargs, frames):
    """The first call of a model under ``block_guard="modules"``: eager, observed (the blocks'
    calls found), then guarded from the next call on."""
    output = guard.observe(model._call_impl, args, kwargs, frames)
    if guard.why_uncached is not None:
        backend.uncached_graphs.append(guard.why_uncached)
        warnings.warn(f"adacache: {type(model).__name__} runs uncached: {guard.why_uncached}; try "
                      "block_guard='graph'", AdaCacheWarning, stacklevel=3)
    return output

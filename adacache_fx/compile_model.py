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

import contextlib
import functools
import logging
import warnings
from typing import Callable, Optional, Union

import torch

from .backend import AdaCacheBackend, adacache_backend
from .block_regions import BlockRegions, min_blocks_for, region_failed
from .config import AdaCacheConfig
from .errors import AdaCacheConfigError, AdaCacheWarning, find_in_chain
from .passes.analysis.choose_guard import BlockFrames, BlockGraphBreak, GuardChoice
from .runtime.module_guard import ModuleBlockGuard
from .tracing import (capture_failed, data_dependent_capture, frames_parameter, frames_value, mark_batch_dynamic,
                      prepare_hooks_for_tracing, trace_config)

logger = logging.getLogger("adacache_fx")

__all__ = ["CompiledModel", "compile_model", "data_dependent_capture", "uncompile_model"]

# The attribute of a model compiled by compile_model that holds its undo record.
INSTALLED = "_adacache_compiled"
# Marks the instance's cache_context that also enters the backend's (undone by uncompile_model).
_FORWARDS_CONTEXT = "_adacache_forwards_context"


class CompiledModel:
    """The undo record of one ``compile_model``: what it changed on the model, and the backend."""

    def __init__(self, model: torch.nn.Module, backend: AdaCacheBackend, guards: list, regions: list):
        self.backend = backend
        self._guards = guards   # [the module guard or None], set when the auto guard switches
        self._regions = regions   # [the blocks marked as nested compile regions, or None]
        self._model = model

    @property
    def guard(self) -> Optional[ModuleBlockGuard]:
        return self._guards[0]

    def undo(self) -> None:
        """The model as before ``compile_model``: its own call (``module.compile`` undone), its
        ``cache_context``, its blocks' own class (traced once each) and, under the block-list
        guard, every block's own forward."""
        if self.guard is not None:
            self.guard.uninstall()
        _drop_regions(self._regions)
        if getattr(self._model.__dict__.get("cache_context"), _FORWARDS_CONTEXT, False):
            del self._model.__dict__["cache_context"]
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
                  block_guard: str = "auto", backend: Optional[AdaCacheBackend] = None,
                  **compile_kwargs) -> AdaCacheBackend:
    """Compile ``model`` in place (``model.compile``: the module keeps its class, attributes and
    state-dict keys) with the AdaCache backend, and return the backend.

    ``capture_data_dependent`` (default True): trace the model's calls under
    :func:`data_dependent_capture`, so that ``.item()``, ``.tolist()`` and ``nonzero``-like ops
    stay inside the graph. ``block_guard``: ``"auto"`` (default) finds out on the first call
    whether Dynamo's graphs hold whole blocks (``passes/analysis/choose_guard.py``): if they do,
    the regions the backend finds inside them are cached (``"graph"``); if Dynamo breaks the graph
    inside the blocks (a Python loop over a tensor's values), the block lists are guarded at their
    calls (``"modules"``: that call runs again eagerly and finds the blocks,
    ``runtime/module_guard.py``; the blocks and the rest of the model are compiled by the inner
    compiler). ``"graph"`` / ``"modules"`` force one; ``backend.guard_choices`` says which each
    model got and why. ``compile_kwargs`` go to
    ``model.compile`` (``dynamic=``, ``fullgraph=``). ``backend``: compile into this backend
    instead of a new one (``config`` / ``inner`` / ``mode`` / ``options`` are then its own): the
    models of one pipeline share the backend, each with its own schedule and cache, and models of
    one class share its compiled code. Raises ``RuntimeError`` when the model is already compiled."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_model takes an nn.Module, got {type(model).__name__}")
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise RuntimeError("compile_model: this module is already compiled (module.compile or compile_model was "
                           "called on it); compile it once")
    if block_guard not in ("auto", "graph", "modules"):
        raise AdaCacheConfigError(f"compile_model: block_guard must be 'auto', 'graph' or 'modules', "
                                  f"got {block_guard!r}")
    if backend is None:
        backend = adacache_backend(config, inner=inner, mode=mode, options=options)
    elif config is not None and config != backend.config:
        raise AdaCacheConfigError("compile_model: pass a config or a backend, not both (the backend has its config)")
    backend.runtime.register_model(model)   # its own schedule from its first call, whatever graph runs it
    signature = frames_parameter(model, backend.config)
    prepare_hooks_for_tracing(model)
    name = type(model).__name__
    guards = [_module_guard(model, backend, compile_kwargs) if block_guard == "modules" else None]
    # auto: the candidate blocks, until the first call has shown whether Dynamo traces them whole
    undecided = [BlockFrames(model) if block_guard == "auto" and not backend.config.per_sample else None]
    if block_guard != "auto":
        backend.guard_choices.append(GuardChoice(name, block_guard, "named with block_guard="))
    elif not undecided[0]:
        backend.guard_choices.append(GuardChoice(name, "graph", "no module list of blocks" if not
                                                 backend.config.per_sample else "per_sample=True needs the graph guard"))
    # each block traced once by Dynamo where the backend will compile it once (block_regions.py)
    min_blocks = min_blocks_for(backend.config.compile_blocks)
    regions = [BlockRegions(model, min_blocks) if min_blocks and block_guard != "modules" else None]
    # one compiled call under one backend whichever guard: the module guard's graphs go to the
    # inner compiler through it (TracedCall.modules), so switching guards recompiles no frame
    model.compile(backend=backend, **compile_kwargs)
    compiled = model._compiled_call_impl
    capturing = [capture_data_dependent]
    hooks_prepared = [False]

    def run(args, kwargs):
        try:
            return run_traced(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - only a block that cannot be a nested region is retried
            if not regions[0] or not region_failed(exc):
                raise
            logger.debug("adacache: a block of %s cannot be traced as a nested compile region; its blocks are "
                         "inlined", type(model).__name__, exc_info=True)
            _drop_regions(regions)
            return run_traced(args, kwargs)

    def run_traced(args, kwargs):
        if not capturing[0]:
            with trace_config(False):
                return compiled(*args, **kwargs)
        try:
            with trace_config(True):
                return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only Dynamo's own tracing failures are retried
            if not capture_failed(exc) or block_graph_break(exc) is not None or (regions[0] and region_failed(exc)):
                raise   # (a block that cannot be a region: run() traces it again without the marks)
            capturing[0] = False
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"adacache: tracing {type(model).__name__} with data-dependent ops captured failed "
                          f"({type(exc).__name__}: {first_line}); this model is traced as plain torch.compile "
                          "traces it from now on (its graph breaks at those ops)", AdaCacheWarning, stacklevel=3)
            if guards[0] is not None:
                guards[0].restart_call()
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
        if guards[0] is None:
            with backend.traced_call(frames=frames, blocks=undecided[0]):
                try:
                    output = run(args, kwargs)
                except Exception as exc:  # noqa: BLE001 - only the auto guard's switch is handled
                    why = block_graph_break(exc)
                    if why is None:
                        raise
                    _drop_regions(regions)   # the module guard compiles each block's own forward
                    guards[0] = _module_guard(model, backend, compile_kwargs)
                    backend.settle_guard(GuardChoice(name, "modules", why))
                else:
                    if undecided[0] is not None:
                        undecided[0] = None
                        backend.settle_guard(GuardChoice(name, "graph", "Dynamo traces its blocks whole"))
                    return output
            undecided[0] = None
        guard = guards[0]
        with backend.traced_call(frames=frames, modules=True):
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
    _forward_cache_context(model, backend)
    model.__dict__[INSTALLED] = CompiledModel(model, backend, guards, regions)
    return backend


def _drop_regions(regions: list) -> None:
    if regions[0]:
        regions[0].remove()
    regions[0] = None


def _forward_cache_context(model: torch.nn.Module, backend: AdaCacheBackend) -> None:
    """A model with diffusers' ``cache_context(name)`` (``CacheMixin``; pipelines wrap each
    guidance call in ``cache_context("cond")`` / ``("uncond")``): this instance's context also
    enters ``backend.cache_context(name)``, so the names key the guidance branches."""
    original = getattr(model, "cache_context", None)
    if not callable(original):
        return

    @contextlib.contextmanager
    def cache_context(name, *args, **kwargs):
        with original(name, *args, **kwargs) as value, backend.cache_context(name):
            yield value

    setattr(cache_context, _FORWARDS_CONTEXT, True)
    model.__dict__["cache_context"] = cache_context


def block_graph_break(exc: BaseException) -> Optional[str]:
    """Why the call stopped when ``exc`` (Dynamo's wrapper of the backend's error) carries the
    backend's :class:`BlockGraphBreak`, else None."""
    found = find_in_chain(exc, BlockGraphBreak)
    return found.why if found is not None else None


def _module_guard(model: torch.nn.Module, backend: AdaCacheBackend, compile_kwargs: dict):
    """The block-list guard of ``block_guard="modules"``, its blocks compiled by the inner compiler."""
    if backend.config.per_sample:
        raise AdaCacheConfigError("compile_model: per_sample=True needs block_guard='graph' (the module-level "
                                  "guard takes one decision per call)")
    guard = ModuleBlockGuard(model, backend.runtime,
                             lambda forward: _counters_unspecialised(torch.compile(forward, backend=backend.inner,
                                                                                   **compile_kwargs)))
    backend.graphs.append(guard)
    return guard


def _counters_unspecialised(compiled: Callable) -> Callable:
    """A block's compiled forward traced with the ints on its modules as symbols, not constants:
    research code counts its calls in a module attribute (STDiT3's ``self.fwd_id += 1``), which
    Dynamo would guard on and recompile at every step until its recompile limit (then the blocks
    run uncompiled); one compile serves every block of a class, whose counters differ."""
    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return compiled(*args, **kwargs)
    return call


def _observe(model: torch.nn.Module, backend: AdaCacheBackend, guard, args, kwargs, frames):
    """The first call of a model under the module guard: eager, observed (the blocks' calls
    found), then guarded from the next call on."""
    output = guard.observe(model._call_impl, args, kwargs, frames)
    if guard.why_uncached is not None:
        backend.uncached_graphs.append(guard.why_uncached)
        warnings.warn(f"adacache: {type(model).__name__} runs uncached: {guard.why_uncached}; its blocks must be "
                      "the members of a module list called one after another, each on the previous one's output "
                      "(docs/graph-breaks.md)", AdaCacheWarning, stacklevel=3)
    return output

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
nothing to cache. Dynamo can capture those ops into the graph instead (as data-dependent,
"unbacked" sizes) when ``capture_scalar_outputs`` and ``capture_dynamic_output_shape_ops``
are on. Dynamo reads its config while it traces, that is on the compiled model's calls, so
``compile_model`` turns both on around each call of this model only (``torch._dynamo.config``
is patched for the call and restored after it): the user's global config and their other
compiled models are never changed. The same per-call patch adds the logger methods libraries
install on ``logging.Logger`` (``warning_once``) to Dynamo's ``ignore_logging_functions``, and
before the first call the hooks diffusers installs (context parallelism) resolve what they would
otherwise look up with ``inspect`` inside the traced forward: both would break the graph there.

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
import inspect
import logging
import warnings
from typing import Callable, Optional, Union

import torch

from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound

from .backend import AdaCacheBackend, AdaCacheWarning, adacache_backend
from .config import AdaCacheConfig, AdaCacheConfigError

__all__ = ["DATA_DEPENDENT_CAPTURE", "capture_failed", "compile_model", "data_dependent_capture", "frames_argument",
           "mark_batch_dynamic"]

# Dynamo settings under which data-dependent ops are traced into the graph instead of breaking it.
DATA_DEPENDENT_CAPTURE = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}


def data_dependent_capture():
    """A context (also a decorator) in which Dynamo captures ``.item()``, ``.tolist()`` and ops
    with data-dependent output shapes into the graph. Restores the previous config on exit."""
    return torch._dynamo.config.patch(**DATA_DEPENDENT_CAPTURE)


# Logger methods that libraries add to logging.Logger (transformers' ``warning_once``, which
# diffusers' context-parallel hooks call inside a traced forward). Dynamo breaks the graph at an
# unknown logger method unless it is in ``ignore_logging_functions``; looked up at each call,
# since the method appears only once the library that adds it is imported.
_ADDED_LOGGER_METHODS = ("warning_once", "info_once")


def _ignored_logging_functions() -> dict:
    """The ``ignore_logging_functions`` patch that adds the added logger methods present now
    (empty when none is present or all are already ignored)."""
    current = torch._dynamo.config.ignore_logging_functions
    added = {getattr(logging.Logger, name) for name in _ADDED_LOGGER_METHODS if hasattr(logging.Logger, name)}
    return {"ignore_logging_functions": current | added} if added - current else {}


def _trace_config(capture: bool):
    """The Dynamo config for one call of a model compiled by ``compile_model``: the added logger
    methods ignored, and data-dependent ops captured when ``capture``."""
    patch = dict(_ignored_logging_functions())
    if capture:
        patch.update(DATA_DEPENDENT_CAPTURE)
    return torch._dynamo.config.patch(**patch) if patch else contextlib.nullcontext()


def _prepare_module_hooks(model: torch.nn.Module) -> None:
    """Resolve what diffusers' hooks would compute on their first call inside the traced
    forward (a graph break there fragments the forward); nothing for other models."""
    from .integrations.diffusers import prepare_hooks_for_tracing   # imports no diffusers code
    prepare_hooks_for_tracing(model)


def capture_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is Dynamo failing to trace (under the capture config), not the model's own
    error or the backend's (a config that does not fit the model is the user's to fix)."""
    if isinstance(exc, BackendCompilerFailed):
        return False
    return isinstance(exc, (TorchDynamoException, GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound))


def _frames_parameter(model: torch.nn.Module, config: AdaCacheConfig) -> Optional[inspect.Signature]:
    """The forward's signature when ``config.frames_arg`` names one of its parameters."""
    if config is None or config.frames_arg is None:
        return None
    signature = inspect.signature(model.forward)
    if config.frames_arg not in signature.parameters:
        raise AdaCacheConfigError(f"adacache: frames_arg={config.frames_arg!r} names no argument of "
                                  f"{type(model).__name__}.forward{signature}")
    return signature


def _frames_value(signature: Optional[inspect.Signature], name: str, args, kwargs,
                  frame_dim: Optional[int] = None) -> Optional[int]:
    """The frame count that argument ``name`` gives in this call: an int as it is, a 5-D video
    tensor by its frame dim (``frame_dim``, default 2)."""
    if signature is None:
        return None
    value = signature.bind_partial(*args, **kwargs).arguments.get(name, signature.parameters[name].default)
    if value is None or value is inspect.Parameter.empty:
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 5:
        return int(value.shape[frame_dim if frame_dim is not None else 2])
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdaCacheConfigError(f"adacache: frames_arg={name!r} must be a Python int frame count or a 5-D video "
                                  f"tensor, got {type(value).__name__}"
                                  + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
    return value


def frames_argument(model: torch.nn.Module, config: Optional[AdaCacheConfig], args, kwargs) -> Optional[int]:
    """The frame count ``config.frames_arg`` names in a call of ``model`` (None when not set)."""
    signature = _frames_parameter(model, config)
    return _frames_value(signature, config.frames_arg, args, kwargs, config.video_frame_dim) if signature else None


def mark_batch_dynamic(args, kwargs) -> None:
    """Mark dim 0 of the call's tensors of the first tensor's batch size dynamic (where Dynamo can
    keep it so: ``maybe_mark_dynamic``), so that the regions compile once for every sub-batch of a
    schedule per sample. A batch of one row stays specialised, as Dynamo does for sizes 0 and 1."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()]
    if not tensors:
        return
    batch = tensors[0].shape[0]
    for tensor in tensors:
        if tensor.shape[0] == batch:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


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
    signature = _frames_parameter(model, backend.config)
    _prepare_module_hooks(model)
    guard = _module_guard(model, backend, compile_kwargs) if block_guard == "modules" else None
    model.compile(backend=backend if guard is None else backend.inner, **compile_kwargs)
    compiled = model._compiled_call_impl
    capturing = [capture_data_dependent]
    hooks_prepared = [False]

    def run(args, kwargs):
        if not capturing[0]:
            with _trace_config(False):
                return compiled(*args, **kwargs)
        try:
            with _trace_config(True):
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
            with _trace_config(False):
                return compiled(*args, **kwargs)

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        # packed video: the frame count is a Python int that Dynamo bakes into the graph, so the
        # analysis of a graph traced by this call reads it here
        backend.frames_from_call = _frames_value(signature, backend.config.frames_arg, args, kwargs,
                                                 backend.config.video_frame_dim)
        if backend.config.per_sample:
            mark_batch_dynamic(args, kwargs)
        if not hooks_prepared[0]:   # again at the first call: hooks may be added after compile_model
            _prepare_module_hooks(model)
            hooks_prepared[0] = True
        if guard is None:
            return run(args, kwargs)
        if not guard.observed:
            return _observe(model, backend, guard, args, kwargs, backend.frames_from_call)
        guard.begin_call(args, kwargs, backend.frames_from_call)
        try:
            output = run(args, kwargs)
        except BaseException:
            guard.abort_call()
            raise
        guard.end_call()
        return output

    model._compiled_call_impl = call
    return backend


def _module_guard(model: torch.nn.Module, backend: AdaCacheBackend, compile_kwargs: dict):
    """The block-list guard of ``block_guard="modules"``, its blocks compiled by the inner compiler."""
    from .runtime.module_guard import ModuleBlockGuard
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

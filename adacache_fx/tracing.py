"""Trace: how a model compiled by this library is traced by Dynamo, per call.

The backend sees one Dynamo graph at a time, and a model that calls ``.item()`` / ``.tolist()``
or an op whose output shape depends on the data (``nonzero``, ``masked_select``, expert
routing) breaks Dynamo's graph there under the default config, often inside every block.
Dynamo can capture those ops into the graph instead (as data-dependent, "unbacked" sizes) when
``capture_scalar_outputs`` and ``capture_dynamic_output_shape_ops`` are on; it reads its config
while it traces, that is on the compiled model's calls, so :func:`trace_config` is entered
around each call of a model compiled by ``compile_model`` (and by ``explain``) only. The same
per-call patch adds the logger methods libraries install on ``logging.Logger`` to Dynamo's
``ignore_logging_functions``, and before the first call the hooks diffusers installs (context
parallelism) resolve what they would otherwise look up with ``inspect`` inside the traced
forward (:func:`prepare_hooks_for_tracing`): both would break the graph there. Per-call data
the analysis needs (the frame count ``frames_arg`` names) are read from the call here too.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Optional

import torch
from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound

from .config import AdaCacheConfig
from .errors import AdaCacheConfigError

__all__ = ["DATA_DEPENDENT_CAPTURE", "capture_failed", "data_dependent_capture", "frames_argument", "frames_parameter",
           "frames_value", "mark_batch_dynamic", "prepare_hooks_for_tracing", "trace_config"]

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


def trace_config(capture: bool):
    """The Dynamo config for one call of a model compiled by ``compile_model``: the added logger
    methods ignored, and data-dependent ops captured when ``capture``."""
    patch = dict(_ignored_logging_functions())
    if capture:
        patch.update(DATA_DEPENDENT_CAPTURE)
    return torch._dynamo.config.patch(**patch) if patch else contextlib.nullcontext()


def prepare_hooks_for_tracing(model: torch.nn.Module) -> int:
    """Resolve, before Dynamo traces ``model``, what diffusers' hooks compute on their first
    call; returns how many hooks were resolved (0 for a model without diffusers hooks).

    A context-parallel split hook (``enable_parallelism``) finds the argument it shards by
    ``inspect.signature`` of the wrapped module's forward on its first call and caches the
    parameter indices. Traced inside the compiled forward, that ``inspect`` call is a graph
    break in the loop over the blocks: Dynamo then skips the whole forward frame, the blocks
    reach the backend one per graph (nothing to cache), and the next call recompiles with
    dynamic shapes. Resolved here with the hook's own lookup, the traced forward is one graph.
    Imports no diffusers code: the hooks are found as the attributes diffusers sets."""
    resolved = 0
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in list(getattr(registry, "hooks", {}).values()):
            metadata = getattr(hook, "module_forward_metadata", None)
            lookup = getattr(metadata, "_get_parameter_from_args_kwargs", None)
            if lookup is None or getattr(metadata, "cached_parameter_indices", None) is not None:
                continue
            names = list(getattr(hook, "metadata", None) or {})
            try:   # fills cached_parameter_indices, then finds no argument in () and raises
                lookup(names[0] if names else "", (), {})
            except (ValueError, IndexError):
                pass
            resolved += getattr(metadata, "cached_parameter_indices", None) is not None
    return resolved


def capture_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is Dynamo failing to trace (under the capture config), not the model's own
    error or the backend's (a config that does not fit the model is the user's to fix)."""
    if isinstance(exc, BackendCompilerFailed):
        return False
    return isinstance(exc, (TorchDynamoException, GuardOnDataDependentSymNode, PendingUnbackedSymbolNotFound))


def frames_parameter(model: torch.nn.Module, config: AdaCacheConfig) -> Optional[inspect.Signature]:
    """The forward's signature when ``config.frames_arg`` names one of its parameters."""
    if config is None or config.frames_arg is None:
        return None
    signature = inspect.signature(model.forward)
    if config.frames_arg not in signature.parameters:
        raise AdaCacheConfigError(f"adacache: frames_arg={config.frames_arg!r} names no argument of "
                                  f"{type(model).__name__}.forward{signature}")
    return signature


def frames_value(signature: Optional[inspect.Signature], name: str, args, kwargs,
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
    signature = frames_parameter(model, config)
    return frames_value(signature, config.frames_arg, args, kwargs, config.video_frame_dim) if signature else None


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

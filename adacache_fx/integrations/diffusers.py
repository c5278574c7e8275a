"""AdaCache for diffusers pipelines, in one call.

    from adacache_fx import AdaCacheConfig
    from adacache_fx.integrations.diffusers import enable, disable

    backend = enable(pipe, AdaCacheConfig.fast(30))       # compiles pipe.transformer in place
    image = pipe(..., num_inference_steps=30).images[0]
    print(backend.report())                               # what the last call did

What ``enable`` does:

* compiles the pipeline's denoiser (``pipe.transformer``, else ``pipe.unet``/``pipe.prior``
  when they hold a transformer) in place with :func:`adacache_fx.compile_model` (``module.compile``
  with the backend, and ``.item()`` / ``nonzero`` captured into the graph),
  so the pipeline keeps its components, offload hooks and ``save_pretrained`` untouched; a
  transformer with context parallelism enabled (``enable_parallelism``, before ``enable``) has its
  hooks prepared for tracing (:func:`prepare_hooks_for_tracing`) and is traced in one graph;
* wraps this pipeline object's ``__call__``: before every call the backend is reset (a new
  generation: no delta, probe or schedule survives from the previous request) and the
  generation's step count is taken from the call's ``num_inference_steps`` (the pipeline's
  default when not given), so the last two steps are forced and the MoReg window fits the
  request. A config's own ``num_steps`` is only the fallback when the pipeline has no
  ``num_inference_steps`` argument.

The step clock comes from the pipeline's own scheduler, on the host: its ``timesteps`` are copied
to the CPU once per generation and indexed by the number of ``scheduler.step`` calls so far (plus
its ``begin_index``), so the transformer's device timestep is never read on the host (no device
sync per call). Where that cannot be had (no ``timesteps``, more calls than timesteps), the
backend falls back to reading the timestep input.

Guidance topologies need nothing extra: the backend counts every model call with the same
timestep inside one step as a branch of that step. Classifier-free guidance batched in one call
(DiT, PixArt, SD3, Flux: ``cat([x, x])``) is one branch; guidance as separate cond / uncond
calls (Wan, Cosmos, LTX-2 style pipelines) or three calls (image + text guidance) are two or
three branches: one decision per step, each branch its own cached deltas and probe.

Schedulers: a step is a distinct timestep. Euler / flow-matching Euler, DDIM, DPM-Solver++ and
UniPC call the model once per timestep. Heun calls it twice per interval, at ``t_i`` and again at
``t_{i+1}``; its timesteps are ``t_0, t_1, t_1, t_2, t_2, ...``, so the correction that ends at
``t_{i+1}`` and the prediction that starts there are two branches of step ``i+1``: one decision,
separate deltas, and the step count is still ``num_inference_steps``.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Callable, Optional, Union

import torch

from ..backend import AdaCacheBackend
from ..compile_model import compile_model, uncompile_model
from ..tracing import prepare_hooks_for_tracing  # noqa: F401 - documented here, for diffusers users
from ..config import AdaCacheConfig

_DENOISER_ATTRS = ("transformer", "unet", "prior")
_ATTR = "_adacache"


def _denoiser(pipe, component: Optional[str]):
    names = (component,) if component else _DENOISER_ATTRS
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise ValueError(f"adacache: the pipeline {type(pipe).__name__} has no denoiser among {list(names)}; "
                     "pass component=<attribute name>")


def _steps_of(call, pipe, args, kwargs) -> Optional[int]:
    try:
        bound = inspect.signature(call).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    steps = bound.arguments.get("num_inference_steps")
    return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


class _SchedulerClock:
    """The pipeline scheduler's current timestep as a host float, without a device sync."""

    def __init__(self, pipe):
        # weakly: the backend holds the clock, and Dynamo's code cache holds the backend for the
        # process's life; a strong reference would keep a dropped pipeline alive
        self._pipe = weakref.ref(pipe)
        self.steps_taken = 0
        self.host_timesteps: Optional[torch.Tensor] = None
        self._source_of_copy = None

    def new_generation(self) -> None:
        self.steps_taken = 0
        self.host_timesteps = None
        self._source_of_copy = None

    def count_step(self) -> None:
        self.steps_taken += 1

    def __call__(self) -> Optional[float]:
        scheduler = getattr(self._pipe(), "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
            return None
        if self._source_of_copy is not timesteps:   # set_timesteps made a new tensor: one copy
            self.host_timesteps = timesteps.detach().to("cpu", torch.float64)
            self._source_of_copy = timesteps
        index = (getattr(scheduler, "begin_index", None) or 0) + self.steps_taken
        if index >= len(self.host_timesteps):
            return None
        return float(self.host_timesteps[index])


class _Wrapped:
    """What ``enable`` keeps on the pipeline: the backend, the clock, and how to undo it."""

    def __init__(self, backend: AdaCacheBackend, component: str, module: torch.nn.Module, original_class,
                 clock: _SchedulerClock):
        self.backend = backend
        self.component = component
        self.module = module
        self.original_class = original_class
        self.clock = clock


def _count_scheduler_steps(pipe, clock: _SchedulerClock) -> None:
    """Wrap this pipeline's scheduler instance's ``step`` so the clock counts the steps taken."""
    scheduler = getattr(pipe, "scheduler", None)
    step = getattr(scheduler, "step", None)
    if step is None or getattr(step, "_adacache_counted", False):
        return

    @functools.wraps(step)
    def counted_step(*args, **kwargs):
        clock.count_step()
        return step(*args, **kwargs)

    counted_step._adacache_counted = True
    scheduler.step = counted_step


def enable(pipe, config: Optional[AdaCacheConfig] = None, *, inner: Union[str, Callable] = "inductor",
           mode: Optional[str] = None, options: Optional[dict] = None, component: Optional[str] = None,
           **compile_kwargs) -> AdaCacheBackend:
    """Compile ``pipe``'s denoiser with the AdaCache backend and make every pipeline call one
    generation (reset, ``num_steps`` from ``num_inference_steps``). Returns the backend
    (``backend.report()`` describes the last call). ``compile_kwargs`` go to
    ``module.compile`` (``dynamic=...``, ``fullgraph=...``). Calling ``enable`` again replaces
    the previous backend."""
    if getattr(pipe, _ATTR, None) is not None:
        disable(pipe)
    config = config if config is not None else AdaCacheConfig()
    name, module = _denoiser(pipe, component)
    backend = compile_model(module, config, inner=inner, mode=mode, options=options, **compile_kwargs)
    clock = _SchedulerClock(pipe)
    backend.runtime.timesteps.source = clock

    original = type(pipe)
    call = original.__call__
    fallback_steps = config.num_steps

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        state = getattr(self, _ATTR, None)
        if state is not None:
            steps = _steps_of(call, self, (self,) + args, kwargs)
            state.backend.reset()
            state.backend.set_num_steps(steps if steps is not None else fallback_steps)
            state.clock.new_generation()
            _count_scheduler_steps(self, state.clock)   # the scheduler may have been replaced
        return call(self, *args, **kwargs)

    # a subclass of this object's class only (special methods are looked up on the type);
    # same name and module, so saving / printing the pipeline is unchanged
    wrapped = type(original.__name__, (original,), {"__call__": __call__, "__module__": original.__module__,
                                                    "__qualname__": original.__qualname__})
    pipe.__class__ = wrapped
    object.__setattr__(pipe, _ATTR, _Wrapped(backend, name, module, original, clock))
    return backend


def disable(pipe) -> None:
    """Undo ``enable``: everything it patched is restored (the denoiser's compiled call and, under
    the block-list guard, its blocks' forwards; the scheduler's ``step``; the pipeline's class)."""
    state = getattr(pipe, _ATTR, None)
    if state is None:
        return
    uncompile_model(state.module)
    scheduler = getattr(pipe, "scheduler", None)
    if getattr(getattr(scheduler, "step", None), "_adacache_counted", False):
        del scheduler.step   # the instance attribute: the class's step is seen again
    pipe.__class__ = state.original_class
    pipe.__dict__.pop(_ATTR, None)


def denoiser_of(pipe) -> Optional[torch.nn.Module]:
    """The denoiser ``enable`` compiled on ``pipe`` (None if not enabled)."""
    state = getattr(pipe, _ATTR, None)
    return state.module if state is not None else None


def backend_of(pipe) -> Optional[AdaCacheBackend]:
    """The backend ``enable`` attached to ``pipe`` (None if not enabled)."""
    state = getattr(pipe, _ATTR, None)
    return state.backend if state is not None else None

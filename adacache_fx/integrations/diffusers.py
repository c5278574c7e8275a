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

_EXPERT_ATTRS = ("transformer", "transformer_2")   # Wan 2.2: high-noise, then low-noise expert
_DENOISER_ATTRS = ("unet", "prior")
_ATTR = "_adacache"


def _denoisers(pipe, component) -> list:
    """``[(attribute, module)]``: the pipeline's denoisers. Default: ``transformer`` and, in a
    two-expert pipeline (Wan 2.2), ``transformer_2``; else the first of ``unet`` / ``prior``."""
    names = (component,) if isinstance(component, str) else tuple(component or ())
    found = [(n, getattr(pipe, n, None)) for n in (names or _EXPERT_ATTRS)]
    found = [(n, m) for n, m in found if isinstance(m, torch.nn.Module)]
    if not found and not names:
        found = [(n, m) for n, m in ((n, getattr(pipe, n, None)) for n in _DENOISER_ATTRS)
                 if isinstance(m, torch.nn.Module)][:1]
    if not found:
        raise ValueError(f"adacache: the pipeline {type(pipe).__name__} has no denoiser among "
                         f"{list(names or _EXPERT_ATTRS + _DENOISER_ATTRS)}; pass component=<attribute name>")
    return found


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

    def __init__(self, pipe, on_timesteps: Optional[Callable] = None):
        # weakly: the backend holds the clock, and Dynamo's code cache holds the backend for the
        # process's life; a strong reference would keep a dropped pipeline alive
        self._pipe = weakref.ref(pipe)
        self.on_timesteps = on_timesteps   # (pipe, scheduler, host copy): each generation's timesteps
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
            if self.on_timesteps is not None:
                self.on_timesteps(self._pipe(), scheduler, self.host_timesteps)
        index = (getattr(scheduler, "begin_index", None) or 0) + self.steps_taken
        if index >= len(self.host_timesteps):
            return None
        return float(self.host_timesteps[index])


class _Wrapped:
    """What ``enable`` keeps on the pipeline: the backend, the denoisers, the clock, how to undo it."""

    def __init__(self, backend: AdaCacheBackend, modules: dict, original_class, clock: _SchedulerClock):
        self.backend = backend
        self.modules = modules              # attribute -> denoiser, in the pipeline's order
        self.original_class = original_class
        self.clock = clock
        self.first_step: dict = {}          # attribute -> the pipeline step of its first call this generation

    def new_generation(self) -> None:
        self.clock.new_generation()
        self.first_step.clear()

    def split_steps(self, pipe, scheduler, host_timesteps: torch.Tensor) -> None:
        """Two experts switched at ``boundary_ratio`` (diffusers' Wan 2.2 pipelines: the first runs
        the timesteps at or above ``boundary_ratio * num_train_timesteps``, the second the rest):
        each expert's step count is its share, so its forced last steps are where its share ends and
        a preset follows its own count."""
        boundary = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
        train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        if len(self.modules) != 2 or boundary is None or train_steps is None:
            return
        begin = getattr(scheduler, "begin_index", None) or 0
        high = int((host_timesteps[begin:] >= boundary * train_steps).sum())
        for module, count in zip(self.modules.values(), (high, len(host_timesteps) - begin - high)):
            if count > 0:
                self.backend.set_num_steps(count, model=module)


def _record_first_step(module: torch.nn.Module, name: str, state: _Wrapped) -> None:
    """Wrap the compiled call of ``module`` so the generation's first call of each denoiser
    records the pipeline step it came at (``summary`` numbers an expert's steps by the pipeline's)."""
    compiled = module._compiled_call_impl

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        if name not in state.first_step:
            state.first_step[name] = state.clock.steps_taken + 1
        return compiled(*args, **kwargs)
    module._compiled_call_impl = call


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
           mode: Optional[str] = None, options: Optional[dict] = None, component=None,
           **compile_kwargs) -> AdaCacheBackend:
    """Compile ``pipe``'s denoisers with one AdaCache backend and make every pipeline call one
    generation (reset, ``num_steps`` from ``num_inference_steps``). A two-expert pipeline (Wan 2.2:
    ``transformer`` and ``transformer_2`` switched at ``boundary_ratio``) has both cached, each
    with its own schedule and cache over the steps it runs. ``component``: the denoiser attribute
    (or a list of them) to cache instead. Returns the backend (``backend.report(module)``
    describes the last call of one denoiser, ``adacache_fx.summary(pipe)`` all of them).
    ``compile_kwargs`` go to ``module.compile`` (``dynamic=...``, ``fullgraph=...``). Calling
    ``enable`` again replaces the previous backend."""
    if getattr(pipe, _ATTR, None) is not None:
        disable(pipe)
    config = config if config is not None else AdaCacheConfig()
    denoisers = _denoisers(pipe, component)
    backend = None
    for _name, module in denoisers:   # one backend: experts of one class share its compiled code
        backend = compile_model(module, config if backend is None else None, inner=inner, mode=mode,
                                options=options, backend=backend, **compile_kwargs)
    original = type(pipe)
    state = _Wrapped(backend, dict(denoisers), original, clock=None)
    state.clock = _SchedulerClock(pipe, on_timesteps=_split)
    backend.runtime.timesteps.source = state.clock
    for name, module in denoisers:
        _record_first_step(module, name, state)

    call = original.__call__
    fallback_steps = config.num_steps

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        state = getattr(self, _ATTR, None)
        if state is not None:
            steps = _steps_of(call, self, (self,) + args, kwargs)
            state.backend.reset()
            state.backend.set_num_steps(steps if steps is not None else fallback_steps)
            state.new_generation()
            _count_scheduler_steps(self, state.clock)   # the scheduler may have been replaced
        return call(self, *args, **kwargs)

    # a subclass of this object's class only (special methods are looked up on the type);
    # same name and module, so saving / printing the pipeline is unchanged
    wrapped = type(original.__name__, (original,), {"__call__": __call__, "__module__": original.__module__,
                                                    "__qualname__": original.__qualname__})
    pipe.__class__ = wrapped
    object.__setattr__(pipe, _ATTR, state)
    return backend


def _split(pipe, scheduler, host_timesteps) -> None:
    """The clock's hook on a generation's timesteps: the experts' shares."""
    state = getattr(pipe, _ATTR, None)
    if state is not None:
        state.split_steps(pipe, scheduler, host_timesteps)


def disable(pipe) -> None:
    """Undo ``enable``: everything it patched is restored (the denoiser's compiled call and, under
    the block-list guard, its blocks' forwards; the scheduler's ``step``; the pipeline's class)."""
    state = getattr(pipe, _ATTR, None)
    if state is None:
        return
    for module in state.modules.values():
        uncompile_model(module)
    scheduler = getattr(pipe, "scheduler", None)
    if getattr(getattr(scheduler, "step", None), "_adacache_counted", False):
        del scheduler.step   # the instance attribute: the class's step is seen again
    pipe.__class__ = state.original_class
    pipe.__dict__.pop(_ATTR, None)


def denoiser_of(pipe) -> Optional[torch.nn.Module]:
    """The (first) denoiser ``enable`` compiled on ``pipe`` (None if not enabled)."""
    state = getattr(pipe, _ATTR, None)
    return next(iter(state.modules.values())) if state is not None else None


def denoisers_of(pipe) -> dict:
    """Every denoiser ``enable`` compiled on ``pipe``, by attribute (empty if not enabled)."""
    state = getattr(pipe, _ATTR, None)
    return dict(state.modules) if state is not None else {}


def first_steps_of(pipe) -> dict:
    """Per denoiser attribute, the pipeline step of its first call in the last generation."""
    state = getattr(pipe, _ATTR, None)
    return dict(state.first_step) if state is not None else {}


def backend_of(pipe) -> Optional[AdaCacheBackend]:
    """The backend ``enable`` attached to ``pipe`` (None if not enabled)."""
    state = getattr(pipe, _ATTR, None)
    return state.backend if state is not None else None

"""The ``adacache`` torch.compile backend: trace (Dynamo) → analyse → rewrite → compile → guard.

    backend = adacache_backend(AdaCacheConfig.fast(num_steps=30))   # inner="inductor"
    model = torch.compile(model, backend=backend)

A graph it cannot rewrite is compiled as it is, with a warning: it runs uncached, never wrongly.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from .compile import compile_pieces, count_flops, graph_inputs, resolve_inner
from .config import AdaCacheConfig
from .errors import AdaCacheConfigError, AdaCacheWarning
from .passes.analysis import analyze
from .passes.analysis.choose_guard import BlockFrames, BlockGraphBreak, GuardChoice, block_frame_graph
from .passes.inline_subgraphs import inline_subgraphs
from .passes.rewrite import copy_graph_module, rewrite
from .report import RegionInfo, Report
from .runtime import CachedGraph, RuntimeState
from .runtime.forecasters import forecaster_class
from .runtime.policies.base import forced_step_count
from .runtime.guard_graph import guard_graph

logger = logging.getLogger("adacache_fx")


@dataclass(frozen=True)
class TracedCall:
    """Per-call data of the model call Dynamo traces now, which the graph alone does not show:
    the frame count ``config.frames_arg`` names (Dynamo bakes a Python int into the graph); under
    ``block_guard="auto"`` before the guard is chosen, the model's candidate blocks (a graph of a
    block's own frame stops the call: ``passes/analysis/choose_guard.py``); under the module
    guard, ``modules``: the graphs between the guarded block calls only go to the inner compiler."""

    frames: Optional[int] = None
    blocks: Optional[BlockFrames] = None
    modules: bool = False


class AdaCacheBackend:
    """A torch.compile backend. Each compiled model instance gets its own schedule and cache."""

    def __init__(self, config: Optional[AdaCacheConfig] = None, inner: Union[str, Callable] = "inductor",
                 mode: Optional[str] = None, options: Optional[dict] = None):
        if config is None:
            config = AdaCacheConfig()
        if not isinstance(config, AdaCacheConfig):
            raise ValueError(f"config must be an AdaCacheConfig, got {type(config).__name__}")
        self.config = config
        self.inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "callable")
        self._inner = resolve_inner(inner, mode, options)
        self.runtime = RuntimeState(config)
        self.graphs: list = []            # [CachedGraph]
        self.uncached_graphs: list = []   # [str]: why a graph runs uncached
        self.compile_seconds = 0.0
        self._uncached_flops: list = []   # per uncached graph: its FLOPs, or (graph, fake inputs) to count them
        self.call = TracedCall()          # what compile_model read from the model call being traced
        self.guard_choices: list = []     # [GuardChoice]: per model compiled by compile_model, its guard and why
        self._unsettled: list = []        # [(reason, warning)] of graphs traced before the auto guard was chosen

    @contextlib.contextmanager
    def traced_call(self, frames: Optional[int] = None, blocks: Optional[BlockFrames] = None, modules: bool = False):
        """Within: the model call being run (and traced, on a first call) is ``TracedCall(...)``
        (``compile_model`` and ``explain`` enter it around each call)."""
        previous, self.call = self.call, TracedCall(frames=frames, blocks=blocks, modules=modules)
        try:
            yield self.call
        finally:
            self.call = previous

    @property
    def inner(self) -> Callable:
        """The inner compiler (a torch.compile backend): what compiles each rewritten piece."""
        return self._inner

    # ----- torch.compile protocol ---------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs):
        if self.call.modules:   # a model under the module guard: its blocks are guarded at their calls
            return self._inner(gm, example_inputs)
        if self.call.blocks:
            why = block_frame_graph(gm, self.call.blocks)
            if why is not None:   # nothing of this graph is compiled: compile_model guards the blocks' calls
                raise BlockGraphBreak(why)
        start = time.perf_counter()
        try:
            fn = self._cache(gm, example_inputs)
        except AdaCacheConfigError:
            raise  # the user's config does not fit the model: say so, do not silently run uncached
        except Exception as exc:  # never break the user's model: run it uncached
            logger.debug("adacache: rewrite failed", exc_info=True)
            fn = self._uncached(gm, f"rewrite failed ({type(exc).__name__}: {exc})")
        if fn is None:
            self._uncached_flops.append((gm, graph_inputs(gm, example_inputs)))   # counted when a report asks
            fn = self._inner(gm, example_inputs)
        self.compile_seconds += time.perf_counter() - start
        return fn

    def _cache(self, gm: fx.GraphModule, example_inputs) -> Optional[CachedGraph]:
        work = inline_subgraphs(copy_graph_module(gm))
        analysis = analyze(work.graph, self.config, self.call.frames)
        if not analysis.cacheable:
            return self._uncached(gm, analysis.why_uncacheable())
        rewritten = rewrite(work, analysis, forecast_terms=forecaster_class(self.config.reuse).terms)
        pieces = compile_pieces(rewritten, example_inputs, self._inner)
        cached = guard_graph(rewritten, pieces, self.runtime, owner=traced_owner())
        self.graphs.append(cached)
        logger.debug("adacache: rewrote graph\n%s", analysis.describe())
        return cached

    def _uncached(self, gm, reason: str) -> None:
        message = f"adacache: a graph of {len(gm.graph.nodes)} nodes runs uncached: {reason}"
        if self.call.blocks:   # the guard is not chosen yet: said once it is (``settle_guard``)
            self._unsettled.append((reason, message))
            return None
        self.uncached_graphs.append(reason)
        warnings.warn(message, AdaCacheWarning, stacklevel=3)
        return None

    def settle_guard(self, choice: GuardChoice) -> None:
        """``compile_model``'s auto guard is chosen: under the graph guard, the graphs traced
        before run uncached as said then; under the module guard they are its glue (no warning)."""
        self.guard_choices.append(choice)
        unsettled, self._unsettled = self._unsettled, []
        if choice.guard == "graph":
            for reason, message in unsettled:
                self.uncached_graphs.append(reason)
                warnings.warn(message, AdaCacheWarning, stacklevel=4)

    @property
    def uncached_flops(self) -> int:
        """FLOPs of one call of every graph that runs uncached (counted on the first ask)."""
        self._uncached_flops = [f if isinstance(f, int) else count_flops(*f) for f in self._uncached_flops]
        return sum(self._uncached_flops)

    # ----- user API ---------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: forget every schedule and cached delta."""
        self.runtime.reset()
        for g in self.graphs:
            g.reset()

    def set_config(self, config: AdaCacheConfig) -> None:
        """Use ``config`` from the next generation on (the schedule and reuse fields: codebook,
        MoReg, reuse, forced steps), without recompiling; :func:`adacache_fx.calibrate` does this.
        Fields that shaped the compiled graphs must stay as they were."""
        if not isinstance(config, AdaCacheConfig):
            raise ValueError(f"config must be an AdaCacheConfig, got {type(config).__name__}")
        for name in AdaCacheConfig.graph_fields():
            if getattr(config, name) != getattr(self.config, name):
                raise ValueError(f"set_config: {name} shapes the compiled graphs ({getattr(self.config, name)!r}); "
                                 f"compile with a new backend to change it to {getattr(config, name)!r}")
        self.config = config
        self.runtime.set_config(config)
        self.reset()

    @contextlib.contextmanager
    def generation(self, num_steps: Optional[int] = None):
        """One generation of a raw sampling loop: every schedule and cached delta forgotten on
        entry, ``num_steps`` (if given) its step count (a preset follows it); on exit the step
        count the backend had before is back.

            with backend.generation(num_steps=30):
                for t in timesteps:
                    backend.step(t)
                    v = model(x, t, context)"""
        previous = self.runtime.requested_num_steps
        self.reset()
        if num_steps is not None:
            self.set_num_steps(num_steps)
        try:
            yield self
        finally:
            self.runtime.timesteps.reset()
            if num_steps is not None:
                self.set_num_steps(previous)

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Make the model calls inside this scope the guidance branch ``name`` (as diffusers'
        ``transformer.cache_context("cond")``, which a model compiled by ``compile_model`` /
        ``enable_cache`` forwards here): each name keeps its own cached deltas whatever order the
        calls come in. Without a context, the calls of one step are branches by call order.

            with backend.cache_context("cond"):
                v_cond = model(x, t, text)"""
        if not isinstance(name, str) or not name:
            raise ValueError(f"cache_context: name must be a non-empty string, got {name!r}")
        previous = self.runtime.context_name
        self.runtime.context_name = name
        try:
            yield self
        finally:
            self.runtime.context_name = previous

    def set_num_steps(self, num_steps: Optional[int], model: Optional[torch.nn.Module] = None) -> None:
        """Tell the schedulers how many steps the coming generations have (kept across resets;
        ``None``: back to ``config.num_steps``). With ``model``, that model's alone (it may not have
        run yet): the experts of a two-expert pipeline each run a share of the steps, and each
        expert's forced last steps and MoReg window are where its share is, while a preset's
        codebook stays the one at the backend-wide count (the steps are as large as the whole
        generation's). Without, every model's (their own counts forgotten)."""
        instance = self._instance_of(model, register=True) if model is not None else None
        self.runtime.set_num_steps(num_steps, instance=instance)

    def step(self, timestep) -> None:
        """Announce the timestep of the coming model calls (a Python number or a CPU tensor), so
        that a sampling loop with device timesteps costs no host read of them. Calls with the
        same announced value are branches of one step; ``None`` goes back to reading the input."""
        self.runtime.timesteps.announce(timestep)

    @property
    def scheduler(self):
        """The scheduler of the model instance that ran last."""
        return self.runtime.scheduler(self.runtime.last_instance)

    def report(self, model: Optional[torch.nn.Module] = None) -> Report:
        """What the last (or current) generation did, for ``model`` (default: the model that ran last)."""
        instance = self._instance_of(model) if model is not None else self.runtime.last_instance
        scheduler = self.runtime.scheduler(instance)
        scheduler.finalize()
        regions = [RegionInfo(graph=g_index, region=r_index, blocks=blocks, streams=streams, probe=probe)
                   for g_index, g in enumerate(self.graphs) for r_index, (blocks, streams, probe) in enumerate(g.region_info)]
        return Report(
            computed_steps=list(scheduler.computed_steps),
            num_steps=scheduler.clock.step,
            metrics=list(scheduler.metrics),
            cache_bytes=sum(g.cache_bytes(instance) for g in self.graphs),
            regions=regions,
            uncached_graphs=list(self.uncached_graphs),
            block_executions=sum(r.executions for g in self.graphs for r in g.runners),
            compile_seconds=self.compile_seconds,
            cached_flops=sum(g.region_flops for g in self.graphs),
            total_flops=sum(g.total_flops for g in self.graphs) + self.uncached_flops,
            sample_computed_steps=scheduler.sample_computed_steps,
            sample_metrics=scheduler.sample_metrics,
            forced_steps=forced_step_count(self.config),
        )

    def _instance_of(self, model: torch.nn.Module, register: bool = False) -> int:
        # a graph numbers instances by its first weight, which may be a buffer (rotary tables)
        weights = list(model.parameters()) + list(model.buffers())
        for g in self.graphs:
            found = g.instance_of(weights)
            if found is not None:
                return found
        key = next((k for k in map(self.runtime.registered_key, weights) if k is not None), None)
        if key is not None:   # compiled into this backend (compile_model registers it), not run yet
            return self.runtime.instance(key)
        if register:   # not run yet: its first call will find it by its weights
            return self.runtime.instance(self.runtime.register_model(model))
        raise ValueError(f"report(model): this backend has not run {type(model).__name__} (or not with its weights)")


def traced_owner():
    """What Dynamo is tracing the graph handed to the backend from: the class of the frame's
    ``self`` (a model's ``forward`` and its resume functions after a graph break share it), else
    the frame's code; None outside a trace. Each owner numbers its model instances
    (``RuntimeState.instance``), so two model classes on one backend never share a schedule."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    try:
        tx = InstructionTranslator.current_tx()
    except AttributeError:   # not inside a Dynamo trace (the backend called on a graph directly)
        return None
    if tx is None:
        return None
    owner = tx.f_locals.get("self") if isinstance(getattr(tx, "f_locals", None), dict) else None
    if isinstance(owner, torch.nn.Module):
        return type(owner)
    code = tx.f_code
    return (code.co_filename, code.co_name.split("torch_dynamo_resume_in_")[-1].rsplit("_at_", 1)[0])


def adacache_backend(config: Optional[AdaCacheConfig] = None, inner: Union[str, Callable] = "inductor",
                     mode: Optional[str] = None, options: Optional[dict] = None) -> AdaCacheBackend:
    """Create an AdaCache backend for ``torch.compile(model, backend=...)``."""
    return AdaCacheBackend(config, inner=inner, mode=mode, options=options)


_default: Optional[AdaCacheBackend] = None


def default_backend() -> AdaCacheBackend:
    """The backend behind ``torch.compile(model, backend="adacache")`` (default config). Each
    model compiled with the name has its own schedule in it: ``default_backend().report(model)``."""
    global _default
    if _default is None:
        _default = AdaCacheBackend()
    return _default


def adacache_default_backend(gm: fx.GraphModule, example_inputs):
    """Entry point of the ``adacache`` backend name (``torch_dynamo_backends``)."""
    return default_backend()(gm, example_inputs)


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "adacache" not in _BACKENDS or _BACKENDS.get("adacache") is None:
        register_backend(name="adacache")(adacache_default_backend)


_register()

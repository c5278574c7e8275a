"""The ``adacache`` torch.compile backend: trace (Dynamo) → analyse → rewrite → compile → guard.

    backend = adacache_backend(AdaCacheConfig.fast(num_steps=30))   # inner="inductor"
    model = torch.compile(model, backend=backend)

A graph it cannot rewrite is compiled as it is, with a warning: it runs uncached, never wrongly.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Callable, Optional, Union

import sympy
import torch
import torch.fx as fx

from .passes.analysis import GraphAnalysis, analyze
from .passes.analysis.graph_nodes import is_parameter_placeholder
from .compile import CompiledPieces, compile_pieces, count_flops, resolve_inner
from .config import AdaCacheConfig
from .errors import AdaCacheConfigError, AdaCacheWarning
from .report import RegionInfo, Report
from .passes.rewrite import Rewrite, copy_graph_module, output_position, rewrite
from .runtime import CachedGraph, GraphLayout, RuntimeState
from .compile.sub_batch_plan import plan_per_sample

logger = logging.getLogger("adacache_fx")


# Config fields read while the graphs are analysed and rewritten (set_config cannot change them).
COMPILE_TIME_FIELDS = ("probe_block", "probe_branch", "timestep_arg", "video_frame_dim", "frames_arg", "packed_frames",
                       "moreg_stride", "process_group", "per_sample", "guidance_in_batch")


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
        self.uncached_flops = 0           # FLOPs of one call of every graph that runs uncached
        self.frames_from_call = None      # config.frames_arg of the call being traced (set by compile_model)

    @property
    def inner(self) -> Callable:
        """The inner compiler (a torch.compile backend): what compiles each rewritten piece."""
        return self._inner

    # ----- torch.compile protocol ---------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs):
        start = time.perf_counter()
        try:
            fn = self._cache(gm, example_inputs)
        except AdaCacheConfigError:
            raise  # the user's config does not fit the model: say so, do not silently run uncached
        except Exception as exc:  # never break the user's model: run it uncached
            logger.debug("adacache: rewrite failed", exc_info=True)
            fn = self._uncached(gm, f"rewrite failed ({type(exc).__name__}: {exc})")
        if fn is None:
            self.uncached_flops += count_flops(gm, example_inputs)
            fn = self._inner(gm, example_inputs)
        self.compile_seconds += time.perf_counter() - start
        return fn

    def _cache(self, gm: fx.GraphModule, example_inputs) -> Optional[CachedGraph]:
        work = copy_graph_module(gm)
        analysis = analyze(work.graph, self.config, self.frames_from_call)
        if not analysis.cacheable:
            return self._uncached(gm, analysis.why_uncacheable())
        rewritten = rewrite(work, analysis)
        pieces = compile_pieces(rewritten, example_inputs, self._inner)
        cached = self._guard(rewritten, pieces)
        self.graphs.append(cached)
        logger.debug("adacache: rewrote graph\n%s", analysis.describe())
        return cached

    def _uncached(self, gm, reason: str) -> None:
        self.uncached_graphs.append(reason)
        warnings.warn(f"adacache: a graph of {len(gm.graph.nodes)} nodes runs uncached: {reason}",
                      AdaCacheWarning, stacklevel=3)
        return None

    def _guard(self, rw: Rewrite, pieces: CompiledPieces) -> CachedGraph:
        analysis: GraphAnalysis = rw.analysis
        if analysis.timestep is None and self.config.num_steps is None:
            raise AdaCacheConfigError(
                "adacache: no timestep input found in the graph, so every call is a step and "
                "AdaCacheConfig(num_steps=...) is required (or name the input with timestep_arg=...)")
        placeholders = [n for n in rw.gm.graph.nodes if n.op == "placeholder"]
        parameters = [i for i, n in enumerate(placeholders) if is_parameter_placeholder(n)]
        layout = GraphLayout(
            num_user_outputs=rw.outputs.num_user_outputs, user_output_is_tuple=rw.outputs.user_output_is_tuple,
            deltas=rw.outputs.deltas, probe_index=rw.outputs.probe_index,
            timestep_index=placeholders.index(analysis.timestep) if analysis.timestep is not None else None,
            activation_indices=[i for i in range(len(placeholders)) if i not in parameters],
            parameter_index=parameters[0] if parameters else None,
            frame_axis=analysis.frame_layout.probe_axis if analysis.frame_layout else None,
            symbol_sources=_symbol_sources(pieces.fake_inputs), moreg_stride=self.config.moreg_stride)
        axis = layout.frame_axis
        if axis is not None and axis.gather is not None:
            layout.gather_index = placeholders.index(axis.gather)
        info = [(region.block_paths, [_shape(s.shape) for s in region.streams],
                 analysis.probe.block if analysis.probe.region == r else None)
                for r, region in enumerate(analysis.regions)]
        probe_positions = {analysis.probe.region: output_position(pieces.top, rw.outputs.probe_index,
                                                                  pieces.regions[analysis.probe.region][0])}
        sub_batch = None
        if self.config.per_sample:
            try:
                layout.batch_source, sub_batch, why = plan_per_sample(rw, pieces, placeholders, layout,
                                                                      self.config.guidance_in_batch)
            except Exception as exc:  # noqa: BLE001 - the graph still caches, with one schedule for the batch
                logger.debug("adacache: per-sample plan failed", exc_info=True)
                why = f"the sub-batch plan failed ({type(exc).__name__}: {exc}): one schedule for the batch"
            if why is not None:
                self._warn_per_sample(why)
        # Only graphs that cache take part in the decision, so only they choose the group (with
        # graph breaks, a fragment without the model's collectives must not choose it).
        cached = CachedGraph(top=pieces.top, regions=pieces.regions, layout=layout, runtime=self.runtime,
                             process_group=analysis.process_group, region_info=info,
                             probe_positions=probe_positions, sub_batch=sub_batch)
        if pieces.reuse_step is not None:
            cached.fuse_reused_steps(pieces.reuse_step, rw.fused.delta_inputs)
        cached.region_flops = sum(pieces.flops.get(name, 0) for name, _c, _r in pieces.regions.values())
        cached.total_flops = sum(pieces.flops.values())
        return cached

    @staticmethod
    def _warn_per_sample(why: str) -> None:
        warnings.warn(f"adacache: per_sample: {why}", AdaCacheWarning, stacklevel=4)

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
        for name in COMPILE_TIME_FIELDS:
            if getattr(config, name) != getattr(self.config, name):
                raise ValueError(f"set_config: {name} shapes the compiled graphs ({getattr(self.config, name)!r}); "
                                 f"compile with a new backend to change it to {getattr(config, name)!r}")
        self.config = config
        self.runtime.set_config(config)
        self.reset()

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        """Tell the schedulers how many steps the coming generations have (kept across resets)."""
        self.runtime.set_num_steps(num_steps)

    def step(self, timestep) -> None:
        """Announce the timestep of the coming model calls (a Python number or a CPU tensor), so
        that a sampling loop with device timesteps costs no host read of them. Calls with the
        same announced value are branches of one step; ``None`` goes back to reading the input."""
        self.runtime.clock.announce(timestep)

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
            num_steps=scheduler.step,
            metrics=list(scheduler.metrics),
            cache_bytes=sum(g.cache_bytes(instance) for g in self.graphs),
            regions=regions,
            uncached_graphs=list(self.uncached_graphs),
            block_executions=sum(r.executions for g in self.graphs for r in g.runners),
            compile_seconds=self.compile_seconds,
            cached_flops=sum(g.region_flops for g in self.graphs),
            total_flops=sum(g.total_flops for g in self.graphs) + self.uncached_flops,
            sample_computed_steps=getattr(scheduler, "sample_computed_steps", None),
            sample_metrics=getattr(scheduler, "sample_metrics", None),
        )

    def _instance_of(self, model: torch.nn.Module) -> int:
        weights = list(model.parameters())
        for g in self.graphs:
            found = g.instance_of(weights)
            if found is not None:
                return found
        raise ValueError(f"report(model): this backend has not run {type(model).__name__} (or not with its weights)")


def _shape(shape) -> tuple:
    return tuple(int(x) if str(x).isdigit() else str(x) for x in shape)


def _symbol_sources(fakes: list) -> dict:
    sources = {}
    for i, value in enumerate(fakes):
        if isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    sources.setdefault(size.node.expr, (i, d))
        elif isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            sources.setdefault(value.node.expr, (i, None))
    return sources


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

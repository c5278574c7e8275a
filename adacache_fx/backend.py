"""The ``adacache`` torch.compile backend.

    backend = adacache_backend(AdaCacheConfig.fast(num_steps=30))   # inner="inductor"
    model = torch.compile(model, backend=backend)

For every graph Dynamo hands over, the backend runs the analysis passes (blocks,
regions, timestep, probe, frame layout), exposes the deltas and the probe as extra
outputs, splits the graph into prologue / region / epilogue pieces, compiles each piece
with the inner compiler and returns a ``CachedGraph`` that guards the regions with the
scheduler's host-side decision. A graph it cannot rewrite is compiled as it is, with a
warning: it runs uncached, never wrongly.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Callable, Optional, Union

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from .config import AdaCacheConfig, AdaCacheConfigError
from .distributed import resolve_process_group
from .passes import analyze
from .passes.add_cache_outputs import add_cache_outputs
from .passes.build_reuse import build_reuse
from .passes.graph_utils import example_value, is_parameter_placeholder
from .passes.split_regions import split_regions
from .report import RegionInfo, Report
from .runtime import CachedGraph, CallState, RegionRunner
from .scheduler import AdaCacheScheduler

logger = logging.getLogger("adacache_fx")


class AdaCacheWarning(UserWarning):
    """A graph runs uncached (and why)."""


def resolve_inner(inner: Union[str, Callable], mode: Optional[str] = None, options: Optional[dict] = None) -> Callable:
    """The compiler for the rewritten pieces: "inductor" (with ``mode``/``options``),
    "eager", "aot_eager", any registered backend name, or a backend callable."""
    if callable(inner):
        if mode or options:
            raise ValueError("mode/options apply to inner='inductor' only")
        return inner
    if not isinstance(inner, str):
        raise ValueError(f"inner must be a backend name or callable, got {inner!r}")
    if inner == "inductor":
        patches = {}
        if mode is not None:
            patches.update(torch._inductor.list_mode_options(mode))
        patches.update(options or {})

        def compile_inductor(gm, example_inputs):
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs, config_patches=patches) if patches else compile_fx(gm, example_inputs)
        return compile_inductor
    if mode or options:
        raise ValueError("mode/options apply to inner='inductor' only")
    if inner == "adacache":
        raise ValueError("inner='adacache' would apply the pass twice")
    return torch._dynamo.lookup_backend(inner)


class _SingleOutput:
    """Calls a piece compiled with tuple outputs and unwraps its single output."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)[0]


class _Piece(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _tuple_outputs(gm: fx.GraphModule) -> bool:
    """Make ``gm`` return a tuple; True if it returned a single value before."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if isinstance(out.args[0], (tuple, list)):
        return False
    out.args = ((out.args[0],),)
    gm.recompile()
    return True


class _FakeRunner(fx.Interpreter):
    """Runs the split top level on fake tensors, recording each piece's example inputs."""

    def __init__(self, top, fake_mode):
        super().__init__(top)
        self.fake_mode = fake_mode
        self.piece_inputs: dict = {}

    def call_module(self, target, args, kwargs):
        self.piece_inputs[target] = list(args)
        with self.fake_mode:
            return self.fetch_attr(target)(*args, **kwargs)


class AdaCacheBackend:
    """A torch.compile backend holding one scheduler (one generation at a time)."""

    def __init__(self, config: Optional[AdaCacheConfig] = None, inner: Union[str, Callable] = "inductor",
                 mode: Optional[str] = None, options: Optional[dict] = None):
        if config is None:
            config = AdaCacheConfig()
        if not isinstance(config, AdaCacheConfig):
            raise ValueError(f"config must be an AdaCacheConfig, got {type(config).__name__}")
        self.config = config
        self.inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "callable")
        self._inner = resolve_inner(inner, mode, options)
        self.scheduler = AdaCacheScheduler(config)
        self.graphs: list = []            # [CachedGraph]
        self.uncached_graphs: list = []   # [str]: why a graph runs uncached
        self.compile_seconds = 0.0

    # ----- torch.compile protocol ---------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs):
        start = time.perf_counter()
        try:
            fn = self._rewrite(gm, example_inputs)
        except AdaCacheConfigError:
            raise  # the user's config does not fit the model: say so, do not silently run uncached
        except Exception as exc:  # never break the user's model: run it uncached
            reason = f"rewrite failed ({type(exc).__name__}: {exc})"
            logger.debug("adacache: %s", reason, exc_info=True)
            fn = None
            self._uncached(gm, reason)
        if fn is None:
            fn = self._inner(gm, example_inputs)
        self.compile_seconds += time.perf_counter() - start
        return fn

    def _uncached(self, gm, reason: str) -> None:
        self.uncached_graphs.append(reason)
        warnings.warn(f"adacache: a graph of {len(gm.graph.nodes)} nodes runs uncached: {reason}",
                      AdaCacheWarning, stacklevel=2)

    def _rewrite(self, gm: fx.GraphModule, example_inputs):
        graph = fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        work = fx.GraphModule(gm, graph)
        analysis = analyze(work.graph, self.config)
        if not analysis.cacheable:
            reason = "no residual block stack found" if not analysis.blocks else "blocks found but no region whose outputs are residual streams"
            self._uncached(gm, reason + "; " + "; ".join(analysis.log[-3:]))
            return None
        if analysis.timestep is None and self.config.num_steps is None:
            raise AdaCacheConfigError(
                "adacache: no timestep input found in the graph, so every call is a step and "
                "AdaCacheConfig(num_steps=...) is required (or name the input with timestep_arg=...)")
        # Only graphs that cache take part in the decision, so only they choose the group
        # (with graph breaks, a fragment without the model's collectives must not reset it).
        group = resolve_process_group(self.config.process_group, work.graph)
        if not self.graphs or self.scheduler.process_group is None:
            self.scheduler.process_group = group
        placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
        cache_outputs = add_cache_outputs(work.graph, analysis.regions, analysis.probe)
        work.recompile()
        split = split_regions(work, analysis.regions)

        fakes = self._fake_inputs(placeholders, example_inputs)
        fake_mode = next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None) or detect_fake_mode(fakes)
        runner = _FakeRunner(split.top, fake_mode)
        runner.run(*fakes)

        state = CallState()
        runners = []
        for r in range(len(analysis.regions)):
            name = split.region_submods[r]
            piece = getattr(split.top, name)
            delta_positions = [_position_in(split.top, index, name) for (rr, _s, index) in cache_outputs.deltas if rr == r]
            probe_position = (_position_in(split.top, cache_outputs.probe_index, name)
                              if analysis.probe.region == r else None)
            reuse = build_reuse(piece, delta_positions, probe_position)
            compute = self._inner(piece, runner.piece_inputs[name])
            region_runner = RegionRunner(r, compute, reuse, state)
            runners.append(region_runner)
            setattr(split.top, name, region_runner)
        for name in split.other_submods:
            piece = getattr(split.top, name)
            single = _tuple_outputs(piece)
            fn = self._inner(piece, runner.piece_inputs[name])
            setattr(split.top, name, _Piece(_SingleOutput(fn) if single else fn))
        split.top.recompile()

        timestep_index = placeholders.index(analysis.timestep) if analysis.timestep is not None else None
        cached = CachedGraph(
            top=split.top, runners=runners, scheduler=self.scheduler, state=state,
            cache_outputs=cache_outputs, timestep_index=timestep_index,
            frame_axis=analysis.frame_layout.probe_axis if analysis.frame_layout else None,
            symbol_sources=_symbol_sources(placeholders, fakes),
            moreg_stride=self.config.moreg_stride, analysis=analysis)
        cached.activation_indices = [i for i, n in enumerate(placeholders) if not is_parameter_placeholder(n)]
        self.graphs.append(cached)
        logger.debug("adacache: rewrote graph\n%s", analysis.describe())
        return cached

    @staticmethod
    def _fake_inputs(placeholders: list, example_inputs) -> list:
        fakes = [example_value(n) for n in placeholders]
        if all(f is not None for f in fakes):
            return fakes
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        return [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]

    # ----- user API ---------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: forget the schedule and every cached delta."""
        self.scheduler.reset()
        for g in self.graphs:
            g.reset()

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        """Tell the scheduler how many steps the coming generation has."""
        self.scheduler.set_num_steps(num_steps)

    def report(self) -> Report:
        """What the last (or current) generation did."""
        self.scheduler.finalize()
        regions = []
        for g_index, g in enumerate(self.graphs):
            for r_index, region in enumerate(g.analysis.regions):
                regions.append(RegionInfo(
                    graph=g_index, region=r_index, blocks=region.block_paths,
                    streams=[tuple(int(x) if str(x).isdigit() else str(x) for x in s.shape) for s in region.streams],
                    probe=(g.analysis.probe.block if g.analysis.probe.region == r_index else None)))
        return Report(
            computed_steps=list(self.scheduler.computed_steps),
            num_steps=self.scheduler.step,
            metrics=list(self.scheduler.metrics),
            cache_bytes=sum(g.cache_bytes() for g in self.graphs),
            regions=regions,
            uncached_graphs=list(self.uncached_graphs),
            block_executions=sum(r.executions for g in self.graphs for r in g.runners),
            compile_seconds=self.compile_seconds,
        )


def _position_in(top: fx.GraphModule, output_index: int, piece_name: str) -> int:
    """Position, in the outputs of ``piece_name``, of the top level's output ``output_index``."""
    out = next(n for n in reversed(top.graph.nodes) if n.op == "output")
    node = out.args[0][output_index]
    if not (node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_module" and node.args[0].target == piece_name):
        raise ValueError(f"output {output_index} does not come from {piece_name}")
    return int(node.args[1])


def _symbol_sources(placeholders: list, fakes: list) -> dict:
    import sympy
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
    """The backend behind ``torch.compile(model, backend="adacache")`` (default config)."""
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

"""``explain(model, *args, **kwargs)``: what the pass would cache, without caching anything."""
from __future__ import annotations


from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from .config import AdaCacheConfig
from .passes.analysis import analyze
from .passes.analysis.choose_guard import BlockFrames, GuardChoice, block_frame_graph
from .passes.analysis.find_branch_cores import find_branch_cores
from .passes.analysis.graph_nodes import nbytes_hint
from .runtime.forecasters import forecaster_class
from .compile import flops_by_node
from .tracing import capture_failed, frames_argument, prepare_hooks_for_tracing, trace_config


@dataclass
class Explanation:
    graphs: list = field(default_factory=list)   # [GraphAnalysis], one per Dynamo graph
    flops: list = field(default_factory=list)    # per graph: (FLOPs inside its regions, FLOPs of one call)
    block_flops: list = field(default_factory=list)   # per graph: (FLOPs of the blocks inside regions, of all blocks)
    capture_failed: Optional[str] = None   # why tracing with data-dependent ops captured failed (then traced without)
    guard: Optional[GuardChoice] = None   # the guard compile_model's default (block_guard="auto") would choose, and why
    branch_cores: list = field(default_factory=list)   # per graph: [BranchCore] (find_branch_cores)
    forecast_terms: int = 0   # tensors the config's forecast keeps per cached tensor besides it

    @property
    def cached_flops_fraction(self) -> float:
        """Share of one forward's FLOPs (every graph) inside the regions that would be cached."""
        total = sum(t for _, t in self.flops)
        return sum(c for c, _ in self.flops) / total if total else 0.0

    @property
    def cached_block_flops_fraction(self) -> float:
        """Share of the blocks' FLOPs (every block found, every graph) inside the cached regions:
        what the schedule can skip of the work the blocks do. A tiny model's stem and head weigh
        more in the forward's share than in a real one's."""
        total = sum(t for _, t in self.block_flops)
        return sum(c for c, _ in self.block_flops) / total if total else 0.0

    @property
    def regions(self) -> list:
        return [r for g in self.graphs for r in g.regions]

    @property
    def probe(self):
        return next((g.probe for g in self.graphs if g.probe is not None), None)

    @property
    def timestep(self):
        return next((g.timestep for g in self.graphs if g.timestep is not None), None)

    @property
    def frame_layout(self):
        return next((g.frame_layout for g in self.graphs if g.frame_layout is not None), None)

    def cache_bytes(self) -> dict:
        """Bytes the cache would hold per guidance branch at the traced call's shape, by what it
        caches: ``"stack"`` (one delta per stream of each region, what the backend caches) and
        ``"branch"`` (one output per residual branch's core of each block, issue 29's branch
        granularity), each with the forecast's extra terms."""
        copies = 1 + self.forecast_terms
        stack = sum(nbytes_hint(stream.output) for r in self.regions for stream in r.streams)
        branch = sum(core.bytes for cores in self.branch_cores for core in cores)
        return {"stack": copies * stack, "branch": copies * branch}

    def __str__(self) -> str:
        parts = [f"{len(self.graphs)} graph(s); {self.cached_flops_fraction:.1%} of one forward's FLOPs "
                 f"({self.cached_block_flops_fraction:.1%} of the blocks' FLOPs) inside the regions that would be cached"]
        if self.guard is not None:
            parts.append(f"guard: {self.guard.guard} ({self.guard.why})")
        if self.capture_failed:
            parts.append(f"(tracing with data-dependent ops captured failed: {self.capture_failed}; traced as plain "
                         "torch.compile traces it)")
        if self.regions:
            size = self.cache_bytes()
            cores = sum(len(c) for c in self.branch_cores)
            parts.append(f"cache per guidance branch at this shape: {size['stack'] / 2**20:.2f} MiB caching the stack's "
                         f"deltas (the backend); {size['branch'] / 2**20:.2f} MiB caching each of the {cores} residual "
                         "branches' cores (branch granularity)")
        for i, g in enumerate(self.graphs):
            parts.append(f"-- graph {i} ({len(g.graph.nodes)} nodes)\n{g.describe()}")
        return "\n".join(parts)


def explain(model: torch.nn.Module, *args, config: AdaCacheConfig = None, capture_data_dependent: bool = True,
            **kwargs) -> Explanation:
    """Trace ``model(*args, **kwargs)`` with Dynamo and run the analysis passes on each graph.
    ``capture_data_dependent`` traces as :func:`adacache_fx.compile_model` does (``.item()``,
    ``nonzero`` ... captured into the graph); False: as plain ``torch.compile``."""
    config = config or AdaCacheConfig()
    result = Explanation(forecast_terms=forecaster_class(config.reuse).terms)

    frames = frames_argument(model, config, args, kwargs)
    prepare_hooks_for_tracing(model)   # as compile_model: hooks that would break the graph on a first call

    blocks = BlockFrames(model)

    def capture(gm: fx.GraphModule, example_inputs):
        why = block_frame_graph(gm, blocks) if blocks else None
        if why is not None and result.guard is None:
            result.guard = GuardChoice(type(model).__name__, "modules", why)
        analysis = analyze(gm.graph, config, frames)
        result.graphs.append(analysis)
        result.branch_cores.append(find_branch_cores(analysis.regions))
        per_node = flops_by_node(gm, example_inputs)
        inside = {n for region in analysis.regions for n in region.nodes}
        result.flops.append((sum(f for n, f in per_node.items() if n in inside), sum(per_node.values())))
        in_blocks = {n for block in analysis.blocks for n in block.nodes}
        result.block_flops.append((sum(f for n, f in per_node.items() if n in inside and n in in_blocks),
                                   sum(f for n, f in per_node.items() if n in in_blocks)))
        return gm.forward

    compiled = torch.compile(model, backend=capture, dynamic=False)
    # a model compiled in place (compile_model, module.compile) is traced as written, not through
    # its own compiled call (whose graphs would go to its backend, not to this analysis)
    in_place = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        try:
            _trace(compiled, args, kwargs, capture_data_dependent)
        except Exception as exc:  # noqa: BLE001 - as compile_model: retraced without capture
            if not (capture_data_dependent and capture_failed(exc)):
                raise
            result.graphs.clear(), result.flops.clear(), result.block_flops.clear(), result.branch_cores.clear()
            result.guard = None
            result.capture_failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            torch._dynamo.reset()
            _trace(compiled, args, kwargs, False)
    finally:
        model._compiled_call_impl = in_place
    if result.guard is None:
        result.guard = GuardChoice(type(model).__name__, "graph", "Dynamo traces its blocks whole" if blocks
                                   else "no module list of blocks")
    return result


def _trace(compiled, args, kwargs, capture_data_dependent: bool) -> None:
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=False), trace_config(capture_data_dependent):
        compiled(*args, **kwargs)

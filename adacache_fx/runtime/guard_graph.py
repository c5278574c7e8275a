"""Guard a rewritten graph: the ``CachedGraph`` that Dynamo calls in its place, built from the
rewrite's result and its compiled pieces (what the runtime needs to know of the graph's inputs
and outputs, where the probe leaves its region's piece, the sub-batch plan of per-sample
schedules, the fused reused step)."""
from __future__ import annotations

import logging
import warnings

import sympy
import torch

from ..compile.sub_batch_plan import plan_per_sample
from ..errors import AdaCacheConfigError, AdaCacheWarning
from ..passes.analysis.graph_nodes import is_parameter_placeholder
from ..passes.rewrite import Rewrite, output_position
from .cached_graph import CachedGraph, GraphLayout
from .state import RuntimeState

logger = logging.getLogger("adacache_fx")


def guard_graph(rw: Rewrite, pieces, runtime: RuntimeState, owner=None) -> CachedGraph:
    """The guarded callable of rewritten graph ``rw`` whose pieces ``pieces`` are compiled;
    ``owner``: the class (or function) Dynamo traced it from (each owner numbers its instances)."""
    analysis, config = rw.analysis, runtime.config
    if analysis.timestep is None and config.num_steps is None:
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
        symbol_sources=_symbol_sources(pieces.fake_inputs), moreg_stride=config.moreg_stride)
    axis = layout.frame_axis
    if axis is not None and axis.gather is not None:
        layout.gather_index = placeholders.index(axis.gather)
    info = [(region.block_paths, [_shape(s.shape) for s in region.streams],
             analysis.probe.block if analysis.probe.region == r else None)
            for r, region in enumerate(analysis.regions)]
    probe_positions = {analysis.probe.region: output_position(pieces.top, rw.outputs.probe_index,
                                                              pieces.regions[analysis.probe.region][0])}
    sub_batch = None
    if config.per_sample:
        try:
            layout.batch_source, sub_batch, why = plan_per_sample(rw, pieces, placeholders, layout,
                                                                  config.guidance_in_batch)
        except Exception as exc:  # noqa: BLE001 - the graph still caches, with one schedule for the batch
            logger.debug("adacache: per-sample plan failed", exc_info=True)
            why = f"the sub-batch plan failed ({type(exc).__name__}: {exc}): one schedule for the batch"
        if why is not None:
            warnings.warn(f"adacache: per_sample: {why}", AdaCacheWarning, stacklevel=5)
    # Only graphs that cache take part in the decision, so only they choose the group (with
    # graph breaks, a fragment without the model's collectives must not choose it).
    cached = CachedGraph(top=pieces.top, regions=pieces.regions, layout=layout, runtime=runtime,
                         process_group=analysis.process_group, region_info=info,
                         probe_positions=probe_positions, sub_batch=sub_batch, flops=pieces.count_flops,
                         owner=owner)
    cached.block_compiles = dict(pieces.block_compiles)   # region -> BlockCompile: how it was compiled
    if pieces.reuse_step is not None:
        cached.fuse_reused_steps(pieces.reuse_step, rw.fused.delta_inputs, rw.fused.terms)
    return cached


def _shape(shape) -> tuple:
    return tuple(int(x) if str(x).isdigit() else str(x) for x in shape)


def _symbol_sources(fakes: list) -> dict:
    """sympy symbol -> (graph input, dim or None): where each dynamic size is read at a call."""
    sources = {}
    for i, value in enumerate(fakes):
        if isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    sources.setdefault(size.node.expr, (i, d))
        elif isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            sources.setdefault(value.node.expr, (i, None))
    return sources

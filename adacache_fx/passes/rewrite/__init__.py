"""Rewrite: turn an analysed graph into guarded cache-or-compute pieces.

``REWRITE_PASSES`` is the ordered pass list; every pass has the signature
``pass_(rewrite: Rewrite) -> None`` and says what it did with ``rewrite.note``:

1. ``add_cache_outputs``: each stream's delta and the probe become extra graph outputs;
2. ``split_regions``: prologue | region | epilogue pieces (``torch.fx`` ``split_module``);
3. ``build_reuse``: per region, a reuse piece ``skeleton(in) + cached_delta`` (blocks dropped);
4. ``fuse_reuse``: a reused step as one graph, from the graph before the split: each stream's
   output replaced by ``skeleton(input) + delta`` (the delta's forecast inside it: ``forecast_terms``
   term inputs per delta and their coefficients), only the user outputs kept, dead code dropped.

``rewrite`` works on a copy of Dynamo's graph module: the analysis must have been made on that
copy (its nodes are the ones rewritten), and Dynamo's own graph is never touched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from ..analysis import GraphAnalysis
from .add_cache_outputs import CacheOutputs, add_cache_outputs
from .build_reuse import build_reuse
from .fuse_reuse import FusedReuse, fuse_reuse
from .split_regions import SplitGraph, split_regions

logger = logging.getLogger("adacache_fx")


@dataclass
class Rewrite:
    gm: fx.GraphModule                      # the analysed copy, rewritten in place
    analysis: GraphAnalysis
    outputs: Optional[CacheOutputs] = None  # where the deltas and the probe are in the outputs
    split: Optional[SplitGraph] = None
    reuse: dict = field(default_factory=dict)   # region index -> reuse GraphModule
    fused: Optional[FusedReuse] = None          # a reused step as one graph (None: it could not be built)
    forecast_terms: int = 0                     # tensors the forecaster keeps per delta (the fused step's inputs)
    log: list = field(default_factory=list)

    def note(self, message: str) -> None:
        self.log.append(message)
        logger.debug("adacache: %s", message)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph (same submodules and parameters)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _pass_add_cache_outputs(rw: Rewrite) -> None:
    rw.outputs = add_cache_outputs(rw.gm.graph, rw.analysis.regions, rw.analysis.probe)
    rw.gm.recompile()
    rw.note(f"add_cache_outputs: {len(rw.outputs.deltas)} deltas, probe at output {rw.outputs.probe_index}")


def _pass_split_regions(rw: Rewrite) -> None:
    rw.split = split_regions(rw.gm, rw.analysis.regions)
    rw.note(f"split_regions: regions {rw.split.region_submods}, other pieces {rw.split.other_submods}")


def _pass_build_reuse(rw: Rewrite) -> None:
    top = rw.split.top
    for r, name in rw.split.region_submods.items():
        deltas = [output_position(top, index, name) for (rr, _s, index) in rw.outputs.deltas if rr == r]
        probe = output_position(top, rw.outputs.probe_index, name) if rw.analysis.probe.region == r else None
        rw.reuse[r] = build_reuse(getattr(top, name), deltas, probe)
        kept = sum(1 for n in rw.reuse[r].graph.nodes if n.op not in ("placeholder", "output"))
        rw.note(f"build_reuse: region {r} reuses {len(deltas)} deltas with {kept} ops")


def _pass_fuse_reuse(rw: Rewrite) -> None:
    try:
        rw.fused = fuse_reuse(rw.gm, rw.analysis.regions, rw.outputs.deltas, rw.outputs.num_user_outputs,
                              rw.forecast_terms)
    except Exception as exc:  # noqa: BLE001 - reused steps then run piece by piece, as before
        logger.debug("adacache: fuse_reuse failed", exc_info=True)
        rw.note(f"fuse_reuse: not fused ({type(exc).__name__}: {exc}); reused steps run piece by piece")
        return
    kept = sum(1 for n in rw.fused.gm.graph.nodes if n.op not in ("placeholder", "output"))
    rw.note(f"fuse_reuse: a reused step is one graph of {kept} ops, {len(rw.fused.delta_inputs)} cached deltas in "
            f"with {rw.forecast_terms} forecast term(s) each")


REWRITE_PASSES = (
    _pass_add_cache_outputs,
    _pass_split_regions,
    _pass_build_reuse,
    _pass_fuse_reuse,
)


def rewrite(gm: fx.GraphModule, analysis: GraphAnalysis, forecast_terms: int = 0) -> Rewrite:
    """Run ``REWRITE_PASSES`` on ``gm`` (the copy ``analysis`` was made on). ``forecast_terms``:
    the tensors the config's forecaster keeps per delta, which the fused reused step takes."""
    if analysis.graph is not gm.graph:
        raise ValueError("rewrite: the analysis was made on another graph; analyse the copy you rewrite")
    if not analysis.cacheable:
        raise ValueError("rewrite: the analysis found nothing to cache")
    rw = Rewrite(gm=gm, analysis=analysis, forecast_terms=forecast_terms)
    for run_pass in REWRITE_PASSES:
        run_pass(rw)
    return rw


def output_position(top: fx.GraphModule, output_index: int, piece_name: str) -> int:
    """Position, in the outputs of ``piece_name``, of the top level's output ``output_index``."""
    out = next(n for n in reversed(top.graph.nodes) if n.op == "output")
    node = out.args[0][output_index]
    if not (node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_module" and node.args[0].target == piece_name):
        raise ValueError(f"output {output_index} does not come from {piece_name}")
    return int(node.args[1])

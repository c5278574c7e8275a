"""Fuse a reused step into one graph: the rewritten graph (before it is split) with each
stream's output replaced by ``skeleton(input) + delta``, the cached delta (or its forecast) an
input, keeping only what the model's own outputs need.

A reused step through the split top level runs each piece separately (prologue, each region's
reuse piece, epilogue): one compiled call per piece, the Python of the top level between them,
and the prologue's work for the blocks alone (text and timestep projections, rotary tables),
which nothing reads on a reused step. On a model whose blocks are cheap per call (few tokens, a
CPU), that is most of a reused step's time. The fused graph is one piece, compiled once by the
inner compiler; the split top level still runs computed steps, and per-sample calls that
compute some rows.

Before (the graph with its cache outputs, ``add_cache_outputs``)::

    def forward(x, t, text):
        h = stem(x); temb = time_embedding(t); ctx = text_proj(text)
        h_12 = blocks(h, ctx, temb)                     # region 0
        delta_0_0 = h_12 - h
        return (head(h_12, temb), delta_0_0, attn_3)   # user outputs, deltas, probe

After (the cached deltas, their forecast terms and the terms' coefficients are inputs, only
the user outputs are returned; here a forecaster of one term, ``reuse="linear"``)::

    def forward(x, t, text, cached_delta_0_0, forecast_term_0_0_0, forecast_coefficients):
        h = stem(x); temb = time_embedding(t)          # the text projection and the blocks are gone
        delta = cached_delta_0_0 + forecast_term_0_0_0 * forecast_coefficients[0]
        return (head(h + delta, temb),)

The forecast is the same multiply-then-add per term as ``runtime/forecasters.apply_forecast``,
so the inner compiler fuses it with the rest: no forecast delta is materialised per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.graph_nodes import is_global_state
from .build_reuse import add_reused_stream, heavy_nodes


@dataclass
class FusedReuse:
    """The fused reuse graph and what its extra inputs are."""

    gm: fx.GraphModule
    delta_inputs: list       # [(region, stream)] in the order of the extra inputs (after the graph's own)
    terms: int = 0           # forecast terms after each delta; with terms, one coefficient tensor (terms,) last

    def delta_placeholders(self) -> list:
        """The placeholders of the deltas and their terms, in order (their metadata: the deltas'
        recorded values); the coefficient tensor's is not among them."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        extra = len(self.delta_inputs) * (1 + self.terms)
        first = len(placeholders) - extra - (1 if self.terms else 0)
        return placeholders[first:first + extra]


def fuse_reuse(gm: fx.GraphModule, regions: list, deltas: list, num_user_outputs: int, terms: int = 0) -> FusedReuse:
    """``gm``: the graph with its cache outputs; ``regions``: the analysis' regions (their nodes);
    ``deltas``: ``[(region, stream, output index)]`` (``CacheOutputs.deltas``); ``terms``: forecast
    terms per delta. Raises ``ValueError`` when the reused step would still run a block op."""
    graph = fx.Graph()
    env: dict = {}
    out_value = graph.graph_copy(gm.graph, env)
    outputs = list(out_value) if isinstance(out_value, (tuple, list)) else [out_value]
    graph.output(tuple(outputs[:num_user_outputs]) if isinstance(out_value, (tuple, list)) else outputs[0])
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs: dict = {}
    for r, s, index in deltas:   # the extra inputs, after the graph's own
        recorded = {k: v for k, v in outputs[index].meta.items() if k in ("example_value", "val")}
        inputs[(r, s)] = []
        for name in [f"cached_delta_{r}_{s}"] + [f"forecast_term_{r}_{s}_{i}" for i in range(terms)]:
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(name)
            anchor.meta = dict(recorded)
            inputs[(r, s)].append(anchor)
    coefficients = None
    if terms:
        with graph.inserting_after(anchor):
            coefficients = anchor = graph.placeholder("forecast_coefficients")
    nodes_of = [{env[n] for n in region.nodes if n in env} for region in regions]
    inside = set().union(*nodes_of)
    for r, s, index in deltas:
        stream_out, skeleton = outputs[index].args   # the delta output is sub(stream output, skeleton)
        # after the skeleton (for a boundary stream, the region's input: after the inputs)
        with graph.inserting_after(skeleton if skeleton.op != "placeholder" else anchor):
            delta, *stream_terms = inputs[(r, s)]
            added = []
            # the forecast of the delta: delta + sum_i term_i * coefficient_i (one multiply, one add each)
            for i, term in enumerate(stream_terms):
                added.append(graph.call_function(torch.select, (coefficients, 0, i)))
                added.append(graph.call_function(torch.mul, (term, added[-1])))
                added.append(delta := graph.call_function(torch.add, (delta, added[-1])))
            reused = add_reused_stream(graph, skeleton, delta)
        for node in added:   # inserting_after puts each new node right after the point: restore their order
            reused.prepend(node)
        own = nodes_of[r]
        stream_out.replace_all_uses_with(reused, delete_user_cb=lambda user, own=own: user not in own)
    # Dead-code elimination that also drops the blocks' impure nodes (an in-place rotary write, a
    # collective's wait): on a reused step they are skipped with the blocks, which is what caching
    # means; outside the regions impure nodes stay, and so do global-state switches (autocast).
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or is_global_state(n)
                              or (n not in inside and n.is_impure()))
    heavy = heavy_nodes([n for n in graph.nodes if n in inside])
    if heavy:
        raise ValueError(f"the fused reused step still computes {[n.name for n in heavy][:5]}")
    graph.lint()
    return FusedReuse(gm=fx.GraphModule(gm, graph), delta_inputs=[(r, s) for r, s, _ in deltas], terms=terms)

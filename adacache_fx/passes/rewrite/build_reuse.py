"""Build a region's reuse path from its compute piece.

The reuse piece takes the compute piece's inputs plus one cached delta per stream and
returns outputs of the same arity: each stream becomes ``skeleton(input) + delta``,
each delta output passes the cached delta through, the probe is ``None``. Keeping only
what the outputs need then drops every block: no attention, no MLP remains, which this pass
checks (an unexpected leftover raises, and the backend then runs the whole graph uncached, with a warning).

Before (compute piece)::

    def forward(x_0, w_q, ..., temb):
        ...blocks...
        x_12 = add(x_11, mlp_5)
        delta = sub(x_12, x_0)
        return (x_12, delta, attn_3)

After (reuse piece)::

    def forward(x_0, w_q, ..., temb, cached_delta_0):
        add = x_0 + cached_delta_0
        return (add, cached_delta_0, None)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis.find_regions import is_scalar_node
from ..analysis.graph_nodes import example_value, is_glue


def _is_light(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if is_glue(node):
        return True
    if node.meta.get("adacache_reuse_add"):
        return True
    return not isinstance(example_value(node), torch.Tensor) and node.meta.get("example_value") is not None


def add_reused_stream(graph: fx.Graph, skeleton: fx.Node, delta: fx.Node) -> fx.Node:
    """``skeleton(input) + delta``: a stream on a reused step, in the piecewise reuse piece and in
    the fused reused step alike (one place for the reuse arithmetic)."""
    node = graph.call_function(torch.add, (skeleton, delta))
    node.meta["adacache_reuse_add"] = True
    return node


def heavy_nodes(nodes) -> list:
    """The nodes of ``nodes`` that do a block's work (neither glue, nor a size, nor the reuse add)."""
    return [n for n in nodes if not _is_light(n)]


def build_reuse(compute: fx.GraphModule, delta_positions: list, probe_position) -> fx.GraphModule:
    """``delta_positions[j]``: where stream j's delta is in ``compute``'s output tuple (its
    node is ``sub(stream_output, skeleton)``); ``probe_position``: the probe's, or None."""
    graph = fx.Graph()
    out_val = graph.graph_copy(compute.graph, {})
    outputs = list(out_val) if isinstance(out_val, (tuple, list)) else [out_val]
    deltas = [outputs[p] for p in delta_positions]
    streams = [d.args[0] for d in deltas]
    skeletons = [d.args[1] for d in deltas]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    cached = []
    with graph.inserting_after(placeholders[-1]):
        for j in reversed(range(len(deltas))):
            cached.insert(0, graph.placeholder(f"cached_delta_{j}"))
    new_outputs = []
    anchor = next(n for n in reversed(graph.nodes))
    for position, value in enumerate(outputs):
        if position in delta_positions:
            new_outputs.append(cached[delta_positions.index(position)])
        elif position == probe_position:
            new_outputs.append(None)
        elif isinstance(value, fx.Node) and value in streams:
            j = streams.index(value)
            with graph.inserting_after(anchor):
                new = add_reused_stream(graph, skeletons[j], cached[j])
            anchor = new
            new_outputs.append(new)
        elif isinstance(value, fx.Node) and is_scalar_node(value):
            new_outputs.append(value)   # a size used after the region: kept if it needs no block op (checked below)
        else:
            raise ValueError(f"region output {value} is neither a stream, a delta nor the probe")
    graph.output(tuple(new_outputs) if isinstance(out_val, (tuple, list)) else new_outputs[0])
    # Dead-code elimination that also drops impure nodes: ``out[..., ::2] = ...`` in a rotary
    # embedding, or a functional collective's ``wait_tensor`` of a sequence-parallel block. On a
    # reused step the blocks' side effects and communication are skipped with the blocks, which is
    # what caching means; every rank skips the same blocks, since the decision is global.
    graph.eliminate_dead_code(is_impure_node=lambda node: node.op in ("placeholder", "output"))
    heavy = heavy_nodes(graph.nodes)
    if heavy:
        raise ValueError(f"the reuse path still computes {[n.name for n in heavy][:5]}: region left uncached")
    graph.lint()
    return fx.GraphModule(compute, graph)

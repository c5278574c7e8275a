"""Expose what the cache needs as extra graph outputs: each stream's delta and the probe.

For every stream of every region, the trunk *skeleton* is copied (the stream's
reshapes/casts with every residual add bypassed, usually the identity) and
``delta = output - skeleton(input)`` is added; the probe residual is added too. All of
them are appended to the graph's outputs, so that splitting the graph makes them
outputs of the region's piece.

Before::

    x_0 = ...                       # prologue
    x_1 = add(x_0, attn_0)          # region 0
    x_2 = add(x_1, mlp_0)           # region 0
    out = final(x_2)
    return (out,)

After::

    ...
    x_2 = add(x_1, mlp_0)
    delta_0_0 = sub(x_2, x_0)       # region 0, stream 0
    out = final(x_2)
    return (out, delta_0_0, attn_0)  # user outputs, deltas, probe

This pass refuses to run twice on one graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.graph_nodes import is_residual_add

_MARK = "_adacache_outputs_added"


@dataclass
class CacheOutputs:
    """Where the extra outputs are, in the rewritten graph's output tuple."""

    num_user_outputs: int
    user_output_is_tuple: bool
    deltas: list = field(default_factory=list)      # [(region, stream, output index)]
    probe_index: int = -1


def add_cache_outputs(graph: fx.Graph, regions: list, probe) -> CacheOutputs:
    if getattr(graph, _MARK, False):
        raise RuntimeError("add_cache_outputs was already applied to this graph; apply it once, to a fresh copy")
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    user = output.args[0]
    is_tuple = isinstance(user, (tuple, list))
    user_outputs = list(user) if is_tuple else [user]
    result = CacheOutputs(len(user_outputs), is_tuple)
    extra = []
    for r, region in enumerate(regions):
        for s, stream in enumerate(region.streams):
            env = {stream.input: stream.input}
            cursor = stream.output
            prev = stream.input
            for node in stream.path:
                if is_residual_add(node):
                    env[node] = env[prev]
                else:
                    with graph.inserting_after(cursor):
                        copy = graph.node_copy(node, lambda a: env.get(a, a))
                    copy.meta = dict(node.meta)
                    env[node] = cursor = copy
                    region.nodes.add(copy)
                prev = node
            skeleton = env[stream.output] if stream.path else stream.input   # boundary stream: delta = out - in
            with graph.inserting_after(cursor):
                delta = graph.call_function(torch.sub, (stream.output, skeleton))
            delta.meta = {k: v for k, v in stream.output.meta.items() if k in ("example_value", "val")}
            region.nodes.add(delta)
            result.deltas.append((r, s, len(user_outputs) + len(extra)))
            extra.append(delta)
    result.probe_index = len(user_outputs) + len(extra)
    if probe.minus is None:
        extra.append(probe.node)
    else:   # rule "block delta": the probe block's own output delta
        with graph.inserting_after(probe.output):
            probe_delta = graph.call_function(torch.sub, (probe.output, probe.minus))
        probe_delta.meta = {k: v for k, v in probe.output.meta.items() if k in ("example_value", "val")}
        regions[probe.region].nodes.add(probe_delta)
        extra.append(probe_delta)
    output.args = (tuple(user_outputs + extra),)
    setattr(graph, _MARK, True)
    graph.lint()
    return result

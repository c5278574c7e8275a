"""Fuse a reused step into one graph: the split top level with every region replaced by its
reuse piece, inlined, keeping only what the model's own outputs need.

A reused step through the split top level runs each piece separately (prologue, each region's
reuse piece, epilogue): one compiled call per piece, the Python of the top level between them,
and the prologue's work for the blocks alone (text and timestep projections, rotary tables),
which nothing reads on a reused step. On a model whose blocks are cheap per call (few tokens, a
CPU), that is most of a reused step's time. The fused graph is one piece, compiled once by the
inner compiler; the split top level still runs computed steps, and per-sample calls that
compute some rows.

Before (split top level; ``submod_1`` is the region, ``reuse`` its reuse piece)::

    def forward(x, t, text):
        submod_0 = self.submod_0(x, t, text)          # stem, temb, text and timestep projections
        h, temb, ctx, proj = submod_0[0], submod_0[1], submod_0[2], submod_0[3]
        submod_1 = self.submod_1(h, ctx, proj)        # the blocks
        out, delta, probe = submod_1[0], submod_1[1], submod_1[2]
        submod_2 = self.submod_2(out, temb)           # head
        return (submod_2, delta, probe)

After (one graph; the cached deltas are inputs, only the user outputs are returned)::

    def forward(x, t, text, cached_delta_0):
        h = stem(x); temb = time_embedding(t)          # the text and timestep projections are gone
        out = h + cached_delta_0
        return (head(out, temb),)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx


@dataclass
class FusedReuse:
    """The fused reuse graph and what its extra inputs are."""

    gm: fx.GraphModule
    delta_inputs: list       # [(region, stream)] in the order of the extra inputs (after the graph's own)

    def delta_placeholders(self) -> list:
        """The extra inputs' placeholders (their metadata: the deltas' recorded values)."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        return placeholders[len(placeholders) - len(self.delta_inputs):]


def fuse_reuse(top: fx.GraphModule, region_submods: dict, reuse: dict, compute_deltas: dict,
               num_user_outputs: int) -> Optional[FusedReuse]:
    """``top``: the split top level with its pieces still fx graphs; ``region_submods``: region
    -> piece name; ``reuse``: region -> reuse piece (``build_reuse``); ``compute_deltas``:
    region -> the delta output nodes of its compute piece (the extra inputs' example values).
    None when a piece is not a graph (nothing to inline)."""
    graph = fx.Graph()
    root = fx.GraphModule(top, fx.Graph())   # attributes of the inlined pieces are registered on it
    env: dict = {}
    top_placeholders = [n for n in top.graph.nodes if n.op == "placeholder"]
    for p in top_placeholders:
        env[p] = graph.placeholder(p.target, type_expr=p.type)
        env[p].meta = dict(p.meta)
    deltas: dict = {}
    delta_inputs = []
    for r in sorted(region_submods):
        for s, node in enumerate(compute_deltas[r]):
            ph = graph.placeholder(f"cached_delta_{r}_{s}")
            ph.meta = {k: v for k, v in node.meta.items() if k in ("example_value", "val")}
            deltas[(r, s)] = ph
            delta_inputs.append((r, s))
    by_name = {name: r for r, name in region_submods.items()}
    for node in top.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = node.args[0]
            user = list(outputs)[:num_user_outputs] if isinstance(outputs, (tuple, list)) else [outputs]
            mapped = [fx.map_arg(v, lambda a: env[a]) for v in user]
            graph.output(tuple(mapped) if isinstance(outputs, (tuple, list)) else mapped[0])
            break
        if node.op == "call_module":
            region = by_name.get(node.target)
            piece = reuse[region] if region is not None else getattr(top, node.target)
            if not isinstance(piece, fx.GraphModule):
                return None
            args = [fx.map_arg(a, lambda a: env[a]) for a in node.args]
            if region is not None:
                args += [deltas[(region, s)] for s in range(len(compute_deltas[region]))]
            env[node] = _inline(graph, root, piece, args, node.target)
            continue
        source = node.args[0] if node.op == "call_function" and node.args else None
        if node.target is operator.getitem and isinstance(source, fx.Node) and isinstance(env[source], tuple):
            env[node] = env[source][node.args[1]]   # an element of an inlined piece's outputs
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.eliminate_dead_code()
    graph.lint()
    gm = fx.GraphModule(root, graph)
    return FusedReuse(gm=gm, delta_inputs=delta_inputs)


def _inline(graph: fx.Graph, root: fx.GraphModule, piece: fx.GraphModule, args: list, prefix: str):
    """Copy ``piece``'s graph into ``graph`` with its placeholders bound to ``args``; returns the
    piece's output value (a tuple of nodes / None, or one node). ``get_attr`` targets move onto
    ``root`` under names prefixed by the piece's."""
    placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise ValueError(f"{prefix}: {len(placeholders)} inputs, called with {len(args)}")
    val_map = dict(zip(placeholders, args))
    result = None
    for n in piece.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            result = fx.map_arg(n.args[0], lambda a: val_map[a])
            break
        copy = graph.node_copy(n, lambda a: val_map[a])
        if n.op in ("get_attr", "call_module"):   # the piece's attribute or submodule, moved onto root
            name = f"{prefix}_{n.target.replace('.', '_')}"
            if not hasattr(root, name):
                setattr(root, name, _get_attr(piece, n.target))
            copy.target = name
        val_map[n] = copy
    return tuple(result) if isinstance(result, list) else result


def _get_attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module

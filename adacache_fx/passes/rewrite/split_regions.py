"""Split the graph into pieces: prologue, one piece per region, and the pieces after.

Uses ``torch.fx.passes.split_module``. Partition ids: ``0`` is the prologue (every node
that depends on no region), region ``r`` is ``2r + 1``, and the nodes that depend on
region ``r`` (and no later one) are ``2r + 2``. Nodes that depend on no region run in
the prologue even where Dynamo traced them later (the final layer's modulation, say).

Before (one graph)::

    prologue ops -> region 0 ops -> epilogue ops -> output

After (top level; each ``submod_i`` is a GraphModule returning a tuple)::

    submod_0 = self.submod_0(x, t, ...)         # prologue
    submod_1 = self.submod_1(getitem, ...)      # region 0: returns (stream, delta, probe)
    submod_2 = self.submod_2(getitem_3, ...)    # epilogue
    return (getitem_6, getitem_4, getitem_5)

Every piece returns a tuple (what inner compilers expect of a graph), and each piece is
told apart by the nodes it holds (split_module keeps their names), not by its name.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module


@dataclass
class SplitGraph:
    top: fx.GraphModule
    region_submods: dict     # region index -> attribute of ``top`` holding its piece
    other_submods: list      # attributes of the prologue/epilogue pieces, in execution order


def region_partition(r: int) -> int:
    return 2 * r + 1


def _has_global_state_nodes(graph: fx.Graph) -> bool:
    targets = (torch.amp._enter_autocast, torch.amp._exit_autocast, torch._C._set_grad_enabled)
    return any(n.op == "call_function" and n.target in targets for n in graph.nodes)


def _make_monotonic(graph: fx.Graph, partition: dict, region_of: dict) -> None:
    """Under autocast or a grad-mode switch, split_module needs partition ids that never
    decrease in graph order (it replays the enter/exit in each piece). Nodes that depend on
    no region but come after one in graph order move to the piece after that region instead
    of the prologue; such a node inside a region's span joins the region's piece when only
    the region uses it. Anything else cannot be split (ValueError: the backend runs the graph
    uncached)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    region_end = {}
    for node, r in region_of.items():
        region_end[r] = max(region_end.get(r, -1), order[node])
    highest = 0
    absorbed = []
    for node in graph.nodes:
        if node not in partition:
            continue
        pid = partition[node]
        if pid < highest:
            if node in region_of:
                raise ValueError(f"region {region_of[node]} is interleaved with other nodes inside an "
                                 f"autocast / grad-mode span (node {node.name})")
            if highest % 2 == 1 and order[node] < region_end[highest // 2]:
                # inside a region's span (a block's modulation from the timestep, say): it may
                # join the region's piece if only that region uses it (a reused step skips it)
                absorbed.append(node)
                pid = highest
            else:
                pid = highest if highest % 2 == 0 else highest + 1
            partition[node] = pid
        highest = max(highest, pid)
    for node in absorbed:
        if any(partition.get(user) != partition[node] for user in node.users):
            raise ValueError(f"node {node.name} inside region {partition[node] // 2}'s autocast / grad-mode "
                             "span is used outside the region")


try:   # how Dynamo records torch.func.vmap (torch >= 2.6)
    from torch._functorch.predispatch import _vmap_decrement_nesting as _VMAP_EXIT
    from torch._functorch.predispatch import _vmap_increment_nesting as _VMAP_ENTER
except ImportError:  # pragma: no cover
    _VMAP_ENTER = _VMAP_EXIT = None


def _pin_vmap_spans(graph: fx.Graph, partition: dict) -> None:
    """Keep each ``vmap`` span (``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting``, as
    Dynamo records ``torch.func.vmap``: flex attention's block-mask construction) in one piece.
    The enter and exit take no tensor, so by data dependence alone they would land in the
    prologue while the batched ops between them sit in a region. They join the piece of the ops
    inside; an op inside that depends on no region joins it too when only the span uses it.
    A span whose ops need two pieces cannot be split (ValueError: the graph runs uncached)."""
    if _VMAP_ENTER is None:
        return
    stack: list = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _VMAP_ENTER:
            stack.append((node, []))
        elif node.op == "call_function" and node.target is _VMAP_EXIT and stack:
            enter, inside = stack.pop()
            pids = {partition[n] for n in inside if n in partition}
            target = max(pids) if pids else partition.get(enter, 0)
            span = set(inside) | {enter, node}
            for n in inside:
                if partition.get(n) == 0 and target != 0 and all(u in span for u in n.users):
                    partition[n] = target
            if len({partition[n] for n in inside if n in partition}) > 1:
                raise ValueError(f"a vmap span ({enter.name} .. {node.name}) holds ops of two pieces")
            partition[enter] = partition[node] = target
            if stack:
                stack[-1][1].extend(span)
        elif stack:
            stack[-1][1].append(node)


def split_regions(gm: fx.GraphModule, regions: list) -> SplitGraph:
    region_of = {}
    for r, region in enumerate(regions):
        for node in region.nodes:
            region_of[node] = r
    level = {}
    partition = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node in region_of:
            partition[node] = region_partition(region_of[node])
            level[node] = region_of[node] + 1
            continue
        lvl = 0
        for arg in node.all_input_nodes:
            lvl = max(lvl, level.get(arg, 0))
        level[node] = lvl
        partition[node] = 0 if lvl == 0 else 2 * lvl
    _pin_vmap_spans(gm.graph, partition)
    if _has_global_state_nodes(gm.graph):
        _make_monotonic(gm.graph, partition, region_of)
    for node, pid in partition.items():  # a region may only use what is computed before it
        if pid % 2 == 1:
            for arg in node.all_input_nodes:
                if arg in partition and partition[arg] > pid:
                    raise ValueError(f"region {pid // 2} depends on later node {arg.name}")

    top = split_module(gm, gm, lambda node: partition[node], keep_original_order=False,
                       keep_original_node_name=True)
    region_of_name = {node.name: r for node, r in region_of.items()}
    region_submods, others = {}, []
    for node in list(top.graph.nodes):
        if node.op != "call_module":
            continue
        piece = getattr(top, node.target)
        _return_tuple(top, node, piece)
        held = {region_of_name.get(n.name) for n in piece.graph.nodes if n.op not in ("placeholder", "output")}
        held.discard(None)
        if held:
            (r,) = held   # a piece holds one region's nodes at most, by construction of the partition
            region_submods[r] = node.target
        else:
            others.append(node.target)
    top.recompile()
    return SplitGraph(top, region_submods, others)


def _return_tuple(top: fx.GraphModule, call: fx.Node, piece: fx.GraphModule) -> None:
    """Make ``piece`` return a tuple; a single-output piece's users in ``top`` read element 0."""
    out = next(n for n in reversed(piece.graph.nodes) if n.op == "output")
    if isinstance(out.args[0], (tuple, list)):
        return
    out.args = ((out.args[0],),)
    piece.recompile()
    users = list(call.users)
    with top.graph.inserting_after(call):
        first = top.graph.call_function(operator.getitem, (call, 0))
    for user in users:
        user.replace_input_with(call, first)

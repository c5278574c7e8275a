"""Split the graph into pieces: prologue, one piece per region, and the pieces after.

Uses ``torch.fx.passes.split_module``. Partition ids: ``0`` is the prologue (every node
that depends on no region), region ``r`` is ``2r + 1``, and the nodes that depend on
region ``r`` (and no later one) are ``2r + 2``. Nodes that depend on no region run in
the prologue even where Dynamo traced them later (the final layer's modulation, say).

Before (one graph)::

    prologue ops -> region 0 ops -> epilogue ops -> output

After (top level; each ``submod_i`` is a GraphModule)::

    submod_0 = self.submod_0(x, t, ...)         # prologue
    submod_1 = self.submod_1(getitem, ...)      # region 0: returns (stream, delta, probe)
    submod_2 = self.submod_2(getitem_3, ...)    # epilogue
    return (submod_2, getitem_4, getitem_5)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch.fx.passes.split_module import split_module


@dataclass
class SplitGraph:
    top: fx.GraphModule
    region_submods: dict     # region index -> submodule name
    other_submods: list      # names of prologue/epilogue pieces


def region_partition(r: int) -> int:
    return 2 * r + 1


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
    for node, pid in partition.items():  # a region may only use what is computed before it
        if pid % 2 == 1:
            for arg in node.all_input_nodes:
                if arg in partition and partition[arg] > pid:
                    raise ValueError(f"region {pid // 2} depends on later node {arg.name}")

    top = split_module(gm, gm, lambda node: partition[node], keep_original_order=False)
    region_submods, others = {}, []
    for node in top.graph.nodes:
        if node.op == "call_module":
            pid = int(str(node.target).rsplit("_", 1)[1])
            if pid % 2 == 1:
                region_submods[pid // 2] = node.target
            else:
                others.append(node.target)
    return SplitGraph(top, region_submods, others)

"""Merge consecutive blocks into cacheable regions and find their streams.

A region is a maximal run of blocks linked through the values they pass on (allowing
cheap glue between blocks, such as Latte's spatial/temporal rearranges), such that
everything leaving the region is a *stream* of a region input, of one of two kinds:

* ``residual``: a value reached from a region input through a trunk of residual adds and
  reshapes/casts; the branches of those adds are the probe candidates::

      i ──(+ attn)──(+ mlp)──reshape──(+ attn)──(+ mlp)── o      # o is a residual stream of i

* ``boundary``: any other value with the shape and dtype of exactly one region input that it
  depends on (post-norm blocks ``x = norm(x + f(x))``, masked updates ``where(m, x + f(x), x)``).
  The cache keeps ``o - i`` and the reuse path returns ``i + delta``: exact on computed steps
  whatever the blocks do inside.

A model whose layout changes between block groups (Flux: double-stream blocks, a concat,
single-stream blocks) gets one region per group, since a concat is not a trunk op and the
concatenated tokens have no input of their shape. Blocks whose outputs only later blocks use
(Wan-VACE's control blocks, whose hints are added between the main blocks) join those blocks'
region, so that nothing they compute leaves it.

Before: ``[Block(blocks.0), Block(blocks.1), ...]``. After:
``[Region(blocks=[...], streams=[Stream(input=x, output=x_12, ...)], nodes={...})]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from .find_blocks import Block
from .reasons import BLOCK_LEFT_UNCACHED, Reason
from .graph_nodes import (describe_node, example_value, is_glue, is_parameter_placeholder, is_residual_add,
                          is_tensor_node, numel_hint, sizes_equal, topo_index)


@dataclass
class ResidualAdd:
    """One ``trunk + branch`` on a stream's trunk."""

    add: fx.Node
    trunk: fx.Node
    branch: fx.Node
    block: Optional[str]   # path of the block holding it (None: glue between blocks)


@dataclass
class Stream:
    """A residual stream through a region: ``output = skeleton(input) + delta``."""

    input: fx.Node
    output: fx.Node
    path: list                     # trunk nodes from input (exclusive) to output (inclusive); [] for boundary
    adds: list                     # [ResidualAdd], in trunk order
    kind: str = "residual"         # "residual" (a trunk of adds) or "boundary" (same-shaped input and output)

    @property
    def shape(self):
        return tuple(example_value(self.output).shape)


@dataclass
class Region:
    """A run of blocks that is cached as one unit."""

    blocks: list                   # [Block]
    nodes: set                     # every fx node computed inside the region
    streams: list = field(default_factory=list)   # [Stream], largest first

    @property
    def block_paths(self) -> list:
        return [b.path for b in self.blocks]


def _trace_trunk(node: fx.Node, region_nodes: set, memo: dict):
    """Trunk path from a region input to ``node`` (list of nodes, input first), or None."""
    if node in memo:
        return memo[node]
    memo[node] = None  # guards against cycles through odd graphs
    if node not in region_nodes:
        ok = node.op != "get_attr" and is_tensor_node(node) and not is_parameter_placeholder(node)
        memo[node] = [node] if ok else None
        return memo[node]
    result = None
    if is_residual_add(node):
        best = None
        for operand in node.args[:2]:
            sub = _trace_trunk(operand, region_nodes, memo)
            if sub is None:
                continue
            # Prefer the operand that already has the add's shape (the trunk, not a
            # broadcast bias such as a positional embedding), then the longer trunk.
            score = (sizes_equal(example_value(operand).shape, example_value(node).shape), len(sub))
            if best is None or score > best[0]:
                best = (score, sub)
        if best is not None:
            result = best[1] + [node]
    elif is_glue(node):
        sub = _trace_trunk(node.args[0], region_nodes, memo)
        if sub is not None:
            result = sub + [node]
    memo[node] = result
    return result


def _stream_of(output: fx.Node, region_nodes: set, block_of: dict) -> Optional[Stream]:
    path = _trace_trunk(output, region_nodes, {})
    if path is None or len(path) < 2:
        return None
    adds = []
    for prev, node in zip(path, path[1:]):
        if is_residual_add(node):
            a, b = node.args[0], node.args[1]
            branch = b if a is prev else a
            adds.append(ResidualAdd(node, prev, branch, block_of.get(node)))
    if not adds:
        return None
    return Stream(input=path[0], output=output, path=path[1:], adds=adds)


_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def is_scalar_node(node: fx.Node) -> bool:
    """A size or other scalar (a SymInt under dynamic shapes: a collective's split sizes), not a tensor."""
    return isinstance(example_value(node), _SCALARS)


def _outputs(nodes: set) -> list:
    """The tensors computed in ``nodes`` and used after them. Scalars used after them (shape
    arithmetic a later block reuses) are no streams: the reuse path recomputes them from its
    inputs' sizes (build_reuse keeps them, and refuses a scalar that needs the blocks)."""
    return [n for n in nodes if any(u not in nodes for u in n.users) and not is_scalar_node(n)]


def _between(region_nodes: set, block: Block, order: dict, graph_nodes: list) -> set:
    """Nodes outside any block that carry region values into ``block`` (glue)."""
    start = max(order[n] for n in region_nodes) + 1
    stop = order[block.first]
    tainted = set()
    for node in graph_nodes[start:stop]:
        if any(isinstance(a, fx.Node) and (a in region_nodes or a in tainted) for a in node.all_input_nodes):
            tainted.add(node)
    # keep the tainted nodes that feed the block
    needed, stack = set(), [a for n in block.nodes for a in n.all_input_nodes if a in tainted]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(a for a in n.all_input_nodes if a in tainted)
    return needed


def _region_inputs(nodes: set) -> list:
    """Activation values computed outside the region that its nodes use, in graph order."""
    inputs = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in nodes and arg.op != "get_attr" and is_tensor_node(arg) and not is_parameter_placeholder(arg):
                inputs[arg] = True
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)} if nodes else {}
    return sorted(inputs, key=lambda n: order[n])


def _depends_on(node: fx.Node, ancestor: fx.Node, nodes: set) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for arg in n.all_input_nodes:
            if arg is ancestor:
                return True
            if arg in nodes and arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return False


def _boundary_stream(out: fx.Node, nodes: set, free_inputs: list) -> Optional[Stream]:
    """``out`` as a boundary stream of the one free region input of its shape and dtype it depends on."""
    value = example_value(out)
    if not isinstance(value, torch.Tensor):
        return None
    matches = [i for i in free_inputs
               if sizes_equal(example_value(i).shape, value.shape) and example_value(i).dtype == value.dtype
               and _depends_on(out, i, nodes)]
    if len(matches) != 1:
        return None
    return Stream(input=matches[0], output=out, path=[], adds=[], kind="boundary")


def _make_region(blocks: list, nodes: set, block_of: dict, why: Optional[list] = None) -> Optional[Region]:
    """The region of ``blocks``, or None (then ``why`` gets the reason)."""
    why = why if why is not None else []
    outs = _outputs(nodes)
    if not outs:
        why.append(Reason.at(BLOCK_LEFT_UNCACHED, "nothing leaves the blocks"))
        return None
    streams, others = [], []
    for out in outs:
        stream = _stream_of(out, nodes, block_of)
        if stream is None:
            others.append(out)
        else:
            streams.append(stream)
    if others:
        free = [i for i in _region_inputs(nodes) if i not in {s.input for s in streams}]
        for out in others:
            stream = _boundary_stream(out, nodes, free)
            if stream is None:
                shape = tuple(example_value(out).shape) if is_tensor_node(out) else type(example_value(out)).__name__
                why.append(Reason.at(BLOCK_LEFT_UNCACHED, f"its output {describe_node(out)} (shape {shape}) is neither "
                                     "a residual stream nor shaped like exactly one region input it depends on", out))
                return None
            free.remove(stream.input)
            streams.append(stream)
    if len({s.input for s in streams}) != len(streams):
        shared = [s for s in streams if sum(t.input is s.input for t in streams) > 1]
        why.append(Reason.at(BLOCK_LEFT_UNCACHED, "two of its outputs are streams of the same input "
                             f"({sorted({s.input.name for s in shared})})", shared[0].output))
        return None
    streams.sort(key=lambda s: -_numel(s.output))
    return Region(blocks=list(blocks), nodes=set(nodes), streams=streams)


def _numel(node: fx.Node) -> int:
    v = example_value(node)
    try:
        return numel_hint(v)   # symbolic sizes: by their hints, with no shape guard
    except Exception:
        return 0


def _merge_feeding_chains(chains: list, order: dict, graph_nodes: list, block_of: dict) -> list:
    """Join a chain to the one before it when the earlier chain is no region by itself (its
    outputs are not streams) and a value of it is used by the later one, in its blocks or the
    glue between them (Wan-VACE: control blocks whose hints are added between the main blocks):
    the hints then stay inside one region, and a reused step skips the control blocks too. A chain
    that is a region by itself stays apart. Where the joined chain holds no valid region, step 2
    falls back to its prefixes as for any chain."""
    merged = [chains[0]]
    for blocks, glue in chains[1:]:
        prev_blocks, prev_glue = merged[-1]
        prev_nodes = set().union(*(set(b.nodes) for b in prev_blocks), *prev_glue)
        if _make_region(prev_blocks, prev_nodes, block_of) is not None:
            merged.append((blocks, glue))
            continue
        later_nodes = set().union(*(set(b.nodes) for b in blocks), *glue)
        reached = set(prev_nodes)   # the earlier chain's values and what is computed from them
        for node in graph_nodes[max(order[n] for n in prev_nodes) + 1:max(order[n] for n in later_nodes) + 1]:
            if any(a in reached for a in node.all_input_nodes):
                reached.add(node)
        if any(n in reached for n in later_nodes):
            # the glue again, now carrying the earlier chain's values too; before the first later
            # block it is everything computed from them (Wan-Animate's face encoder, whose output
            # an adapter adds between the main blocks), not only what feeds that block
            first = order[blocks[0].first]
            nodes = set(prev_nodes) | {n for n in reached - prev_nodes if order[n] < first}
            new_glue = [nodes - prev_nodes]
            nodes |= set(blocks[0].nodes)
            for block in blocks[1:]:
                between = _between(nodes, block, order, graph_nodes)
                new_glue.append(between)
                nodes |= between | set(block.nodes)
            merged[-1] = (prev_blocks + blocks, prev_glue + new_glue)
        else:
            merged.append((blocks, glue))
    return merged


def find_regions(graph: fx.Graph, blocks: list, reasons: Optional[list] = None) -> list:
    """Group ``blocks`` (graph order) into valid regions; ``reasons`` gets a ``Reason`` per block left out."""
    if not blocks:
        return []
    order = topo_index(graph)
    graph_nodes = list(graph.nodes)
    block_of = {n: b.path for b in blocks for n in b.nodes}
    # 1. chains of linked blocks (each with the glue that links it to the previous one)
    chains, current, glue = [], [blocks[0]], [set()]
    nodes = set(blocks[0].nodes)
    for block in blocks[1:]:
        between = _between(nodes, block, order, graph_nodes)
        feeds = any(a in nodes or a in between for n in block.nodes for a in n.all_input_nodes)
        if feeds:
            current.append(block)
            glue.append(between)
            nodes |= between | set(block.nodes)
        else:
            chains.append((current, glue))
            current, glue, nodes = [block], [set()], set(block.nodes)
    chains.append((current, glue))
    chains = _merge_feeding_chains(chains, order, graph_nodes, block_of)
    # 2. each chain: the longest valid prefix becomes a region, the rest is retried
    regions = []
    for chain_blocks, chain_glue in chains:
        start = 0
        while start < len(chain_blocks):
            found, why = None, []
            for stop in range(len(chain_blocks), start, -1):
                nodes = set()
                for i in range(start, stop):
                    nodes |= set(chain_blocks[i].nodes)
                    if i > start:
                        nodes |= chain_glue[i]
                region = _make_region(chain_blocks[start:stop], nodes, block_of, why if stop == start + 1 else None)
                if region is not None:
                    found = (region, stop)
                    break
            if found is None:
                if reasons is not None:
                    first = next((w for w in why if w.node is not None), why[0] if why else None)
                    reasons.append(Reason(BLOCK_LEFT_UNCACHED, f"block {chain_blocks[start].path} left uncached: "
                                          + "; ".join(w.message for w in why),
                                          first.node if first else None, first.op if first else None,
                                          first.source if first else None))
                start += 1
            else:
                regions.append(found[0])
                start = found[1]
    return regions

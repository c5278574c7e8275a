"""Find the expensive core of each residual branch of each block: what caching at branch
granularity would keep and forecast, with the glue around it (norms, the timestep's modulation,
gates, the residual adds) run fresh on a reused step (issue 29; the backend caches the stack).

A branch is what a trunk add adds (``ResidualAdd.branch`` of a stream, ``find_regions.py``). From
it the walk goes up through cheap ops (a gate's multiply, casts, reshapes, a dropout) along the one
input that depends on a heavy op of the block (a linear, a matmul, a convolution, an attention)
and stops at the first heavy op's output, or where two such inputs meet: that node is the core's
output. Everything in the block that only feeds it would go dead on a reused step, the
modulation that also feeds the gate would not. Found from the graph by op kind, no names.

Before (one Wan-like block)::

    mod = chunk(table + temb)                 # glue: the timestep's modulation
    h = norm(x) * (1 + scale) + shift         # glue
    attn = linear(sdpa(...linear(h)...))      # core 0: its output is ``attn``
    x_1 = x + attn * gate                     # glue: the gate and the residual add
    ff = linear(gelu(linear(norm(x_1) ...)))  # core 1: ``ff``
    x_2 = x_1 + ff.float() * c_gate

After: ``[BranchCore(block="blocks.0", add=x_1, output=attn), BranchCore(..., add=x_2, output=ff)]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .graph_nodes import example_value, is_tensor_node, nbytes_hint, op_kind

HEAVY_KINDS = ("matmul", "conv", "last_dim")   # linear, matmul / bmm, convolutions, attention


@dataclass
class BranchCore:
    """The core of one residual branch: the node whose value branch granularity would cache."""

    block: str            # "blocks.3"
    add: fx.Node          # the trunk add the branch feeds
    output: fx.Node       # the core's output
    nodes: frozenset      # the block's nodes that only feed the core (dead on a reused step)

    @property
    def bytes(self) -> int:
        """Bytes of one cached copy of the output, at the traced call's shape."""
        return nbytes_hint(self.output)


def _is_heavy(node: fx.Node) -> bool:
    return op_kind(node) in HEAVY_KINDS or node.op == "call_module"


def _feeds_only(output: fx.Node, block_nodes: set) -> frozenset:
    """The nodes of the block upstream of ``output`` whose every use leads to it."""
    inside, frontier = {output}, [output]
    while frontier:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg in block_nodes and arg not in inside and all(u in inside for u in arg.users):
                inside.add(arg)
                frontier.append(arg)
    return frozenset(inside)


def _core_output(branch: fx.Node, block_nodes: set, heavy_memo: dict):
    def heavy_above(node: fx.Node) -> bool:
        if node not in heavy_memo:
            heavy_memo[node] = False   # (the graph is acyclic; this only bounds the recursion)
            heavy_memo[node] = node in block_nodes and (
                _is_heavy(node) or any(heavy_above(a) for a in node.all_input_nodes))
        return heavy_memo[node]

    node = branch
    if not heavy_above(node):
        return None   # a branch without a heavy op: nothing worth caching apart
    while not _is_heavy(node):
        inputs = [a for a in node.all_input_nodes if heavy_above(a)]
        if len(inputs) != 1:
            return node   # heavy work meets here: the core's output
        node = inputs[0]
    return node


def find_branch_cores(regions: list) -> list:
    """``[BranchCore]`` of every residual add inside a block of ``regions``, in trunk order."""
    cores, memos = [], {}   # per block: node -> whether a heavy op of that block is upstream
    for region in regions:
        nodes_of = {b.path: set(b.nodes) for b in region.blocks}
        for stream in region.streams:
            for residual in stream.adds:
                block_nodes = nodes_of.get(residual.block)
                if block_nodes is None or not is_tensor_node(residual.branch):
                    continue
                output = _core_output(residual.branch, block_nodes, memos.setdefault(residual.block, {}))
                if output is not None and example_value(output) is not None:
                    cores.append(BranchCore(residual.block, residual.add, output, _feeds_only(output, block_nodes)))
    return cores

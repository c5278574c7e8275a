"""Find the block stack from the graph's structure when module metadata does not show it.

Used when ``find_blocks`` finds no repeated module list (blocks held as plain attributes,
a hand-unrolled stack, a graph whose ``nn_module_stack`` is missing). The longest trunk
of residual adds (``x = x + f(x)``, reshapes, casts and norms allowed between: a post-norm
block's ``x = norm(x + f(x))`` continues the trunk through its norm, a masked block's
``where(m, x + f(x), x)`` through the select) is the stack;
its nodes are those that depend on the trunk's first value and feed its last. Each
residual add, with the nodes since the previous one, becomes a pseudo-block
``residual_chain.<k>``, so that ``find_regions`` and the probe choice work unchanged.

Before: a graph with no block lists. After::

    [Block("residual_chain.0", nodes=[ln, q, ..., add_1]), Block("residual_chain.1", ...)]
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .find_blocks import Block
from .graph_nodes import is_glue, is_norm, is_parameter_placeholder, is_residual_add, is_tensor_node, sizes_equal, example_value

MIN_ADDS = 4   # two attention + MLP blocks at least; shorter chains are not worth a cache


def _longest_chain(graph: fx.Graph):
    """(adds on the longest trunk, its first value), over the whole graph."""
    best_len: dict = {}
    best_prev: dict = {}
    for node in graph.nodes:
        if is_residual_add(node):
            cands = [a for a in node.args[:2] if sizes_equal(example_value(a).shape, example_value(node).shape)]
            length, prev = 1, None
            for a in cands:
                if best_len.get(a, 0) + 1 > length:
                    length, prev = best_len[a] + 1, a
            best_len[node], best_prev[node] = length, prev
        elif (is_glue(node) or is_norm(node)) and node.args and node.args[0] in best_len:
            best_len[node], best_prev[node] = best_len[node.args[0]], node.args[0]
        elif _is_select(node):   # masked updates: where(mask, x + f(x), x) continues the longer trunk
            picks = [a for a in node.args[1:3] if a in best_len]
            if picks:
                prev = max(picks, key=lambda a: best_len[a])
                best_len[node], best_prev[node] = best_len[prev], prev
    adds = [n for n in best_len if is_residual_add(n)]
    if not adds:
        return [], None, []
    end = max(adds, key=lambda n: best_len[n])
    chain, path, node = [], [], end
    while node is not None and node in best_len:
        if is_residual_add(node):
            chain.append(node)
        path.append(node)
        start = node
        node = best_prev.get(node)
    chain.reverse()
    path.reverse()
    # the trunk's first value: the operand of the first add that is not in the chain
    first = chain[0]
    trunk_in = _trunk_operand(first, start)
    return chain, trunk_in, path


def _block_ends(chain: list, path: list) -> set:
    """Where each pseudo-block ends: the last trunk node before the next residual add (so a
    post-norm block keeps its norm, a masked block its select), and the last add."""
    adds, start = set(chain), path.index(chain[0])
    ends = {node for node, following in zip(path[start:], path[start + 1:]) if following in adds}
    return ends | {path[-1]}


def _continues_trunk(user: fx.Node, node: fx.Node) -> bool:
    if is_glue(user) or is_norm(user):
        return bool(user.args) and user.args[0] is node
    return _is_select(user) and node in user.args[1:3]


def _trailing(node: fx.Node, path: list) -> list:
    """The trunk after the last add, while it only norms, selects or re-views it (the last
    post-norm or masked block's tail)."""
    while len(node.users) == 1 and _continues_trunk(next(iter(node.users)), node):
        node = next(iter(node.users))
        path.append(node)
    return path


def _is_select(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.where and len(node.args) == 3


def _trunk_operand(add: fx.Node, start: fx.Node) -> Optional[fx.Node]:
    """The trunk value entering the chain: in ``x + f(x)`` the operand the other depends on."""
    if start is not add:
        return start.args[0] if is_glue(start) or is_norm(start) else start
    a, b = add.args[0], add.args[1]
    if _is_ancestor(a, b):
        return a
    if _is_ancestor(b, a):
        return b
    return None


def _is_ancestor(a: fx.Node, b: fx.Node, limit: int = 10000) -> bool:
    seen, stack = set(), [b]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is a:
            return True
        for x in n.all_input_nodes:
            if x not in seen:
                seen.add(x)
                stack.append(x)
    return False


def _reachable(start: fx.Node, neighbours) -> set:
    """Nodes reachable from ``start`` (excluded) through ``neighbours``."""
    seen, stack = set(), [start]
    while stack:
        for n in neighbours(stack.pop()):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def find_residual_chain(graph: fx.Graph) -> list:
    chain, trunk_in, path = _longest_chain(graph)
    if len(chain) < MIN_ADDS or trunk_in is None or not is_tensor_node(trunk_in) or is_parameter_placeholder(trunk_in):
        return []
    path = _trailing(chain[-1], path)
    end = path[-1]
    descendants = _reachable(trunk_in, lambda n: n.users)
    ancestors = _reachable(end, lambda n: n.all_input_nodes) | {end}
    region = descendants & ancestors
    blocks, current, k = [], [], 0
    ends = _block_ends(chain, path)
    for node in graph.nodes:
        if node in region:
            current.append(node)
            if node in ends:
                blocks.append(Block(f"residual_chain.{k}", "residual_chain", k, "residual", current))
                current, k = [], k + 1
    return blocks

"""Group the nodes of a Dynamo graph into transformer blocks.

A block is a child of a repeated module list: the outermost module path of the form
``<list>.<index>`` whose list holds at least two indices of one class
(``transformer_blocks.3``, ``blocks.7``, ``temporal_transformer_blocks.2``, ...), whatever
the attribute names. Lists of mixed classes (``ff.net``: GELU, Dropout, Linear) are not
block lists.

Before (nodes with their ``nn_module_stack``)::

    x_1   = linear(x, ...)            # embed
    ln    = layer_norm(x_1, ...)      # blocks.0.norm1
    x_2   = add(x_1, attn_out)        # blocks.0
    ...
    x_9   = add(x_8, mlp_out)         # blocks.1

After: ``[Block("blocks.0", nodes=[ln, ..., x_2, ...]), Block("blocks.1", ...)]``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from .graph_nodes import example_value, is_residual_add, module_calls, module_stack, op_kind
from .own_forward import wrapper_nodes

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class Block:
    """One transformer block found in the graph."""

    path: str                 # "transformer_blocks.3"
    list_path: str            # "transformer_blocks"
    index: int                # 3
    cls_name: str             # "BasicTransformerBlock"
    nodes: list = field(default_factory=list)   # its fx nodes, in graph order
    cls: object = None        # the module class (None where the graph records only its name)
    wrapper_nodes: list = field(default_factory=list)   # ops traced in hooks around its forward, left out

    @property
    def first(self) -> fx.Node:
        return self.nodes[0]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def _cls_name(cls) -> str:
    return getattr(cls, "__name__", str(cls))


def find_blocks(graph: fx.Graph) -> list[Block]:
    """Return the blocks of ``graph`` in graph order (empty if there is no module metadata).

    Rule 1, module lists: children ``<list>.<i>`` of a list holding at least two indices of one
    class, each doing block work (below). Rule 2, module calls, for the nodes rule 1 leaves: sibling calls of one class under one
    parent call (blocks held as named attributes ``block_0 .. block_5``, a ``ModuleDict``, one
    module applied N times) and indexed children that stand alone (a list of one block), where
    every such call does block work (a residual add and at least two matmul-like ops), so that an
    MLP's two linears or an embedding's layers are never taken for blocks. Either way, the ops
    traced in hooks or wrappers around a block's forward (a context-parallel shard of its input)
    are left out of it (``own_forward``; kept in ``Block.wrapper_nodes``)."""
    calls = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    blocks = _module_list_blocks(calls)
    taken = {n for b in blocks for n in b.nodes}
    blocks += _module_call_blocks([n for n in calls if n not in taken])
    blocks = [b for b in blocks if _peel_wrapper_nodes(b)]
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(blocks, key=lambda b: order[b.first])


def _peel_wrapper_nodes(block: Block) -> bool:
    """Leave the ops traced in hooks / wrappers around the block's forward out of the block
    (see own_forward); False when nothing of the block is left."""
    peeled = set(wrapper_nodes(block.nodes, block.cls))
    if peeled:
        block.wrapper_nodes = [n for n in block.nodes if n in peeled]
        block.nodes = [n for n in block.nodes if n not in peeled]
    return bool(block.nodes)


def _module_list_blocks(calls: list) -> list:
    seen: dict = defaultdict(lambda: defaultdict(set))   # list path -> {index: class names}
    for node in calls:
        for path, cls in module_stack(node):
            m = _INDEXED.match(path)
            if m:
                seen[m.group(1)][int(m.group(2))].add(_cls_name(cls))
    block_lists = {list_path for list_path, by_index in seen.items()
                   if len(by_index) >= 2 and len(set().union(*by_index.values())) == 1}
    members: dict = defaultdict(list)   # child path -> its nodes
    for node in calls:
        for path, _cls in module_stack(node):
            m = _INDEXED.match(path)
            if m and m.group(1) in block_lists:
                members[path].append(node)
                break
    # a list of layers that do no block work (an MLP's stack of linears) is no block list
    block_lists = {lp for lp in block_lists
                   if all(_does_block_work(nodes, unknown=True) for path, nodes in members.items() if _INDEXED.match(path).group(1) == lp)}
    blocks: dict = {}
    for node in calls:
        for path, cls in module_stack(node):  # outermost first
            m = _INDEXED.match(path)
            if m and m.group(1) in block_lists:
                block = blocks.get(path)
                if block is None:
                    block = blocks[path] = Block(path, m.group(1), int(m.group(2)), _cls_name(cls), cls=cls)
                block.nodes.append(node)
                break
    return list(blocks.values())


def _does_block_work(nodes: list, unknown: bool = False) -> bool:
    """A residual add and two matmul-like ops (``unknown`` where the graph records no values to
    tell tensors apart: a symbolic_trace graph)."""
    if not any(example_value(n) is not None for n in nodes):
        return unknown
    heavy = sum(1 for n in nodes if op_kind(n) in ("matmul", "last_dim", "conv") or n.op == "call_module")
    return heavy >= 2 and any(is_residual_add(n) for n in nodes)


def _module_call_blocks(calls: list) -> list:
    # every module call (a key of nn_module_stack: "<id>" or "<id>@<k>" for the k-th repeated call)
    info: dict = {}      # key -> [path, class, parent key, nodes]
    for node in calls:
        parent = None
        for key, path, cls in module_calls(node):
            entry = info.setdefault(key, [path, cls, parent, []])
            entry[3].append(node)
            parent = key
    groups: dict = defaultdict(list)   # (parent key, class) -> call keys, in first-node order
    for key, (path, cls, parent, nodes) in info.items():
        groups[(parent, cls)].append(key)
    candidates = set()
    for (parent, cls), keys in groups.items():
        if not all(_does_block_work(info[k][3]) for k in keys):
            continue
        if len(keys) >= 2 or _INDEXED.match(info[keys[0]][0]):
            candidates.update(keys)
    blocks: dict = {}
    repeats: dict = defaultdict(int)
    for node in calls:
        for key, path, cls in module_calls(node):   # outermost first
            if key in candidates:
                block = blocks.get(key)
                if block is None:
                    k = repeats[path]
                    repeats[path] += 1
                    name = path if k == 0 else f"{path}@{k}"
                    m = _INDEXED.match(path)
                    list_path, index = (m.group(1), int(m.group(2))) if m else (path.rsplit(".", 1)[0] if "." in path else "", k)
                    block = blocks[key] = Block(name, list_path, index, _cls_name(cls), cls=cls)
                block.nodes.append(node)
                break
    return list(blocks.values())

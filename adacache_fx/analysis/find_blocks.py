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

from .graph_nodes import module_stack

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class Block:
    """One transformer block found in the graph."""

    path: str                 # "transformer_blocks.3"
    list_path: str            # "transformer_blocks"
    index: int                # 3
    cls_name: str             # "BasicTransformerBlock"
    nodes: list = field(default_factory=list)   # its fx nodes, in graph order

    @property
    def first(self) -> fx.Node:
        return self.nodes[0]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def _cls_name(cls) -> str:
    return getattr(cls, "__name__", str(cls))


def find_blocks(graph: fx.Graph) -> list[Block]:
    """Return the blocks of ``graph`` in graph order (empty if there is no module metadata)."""
    calls = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    # list path -> {index: set(class names)}
    seen: dict = defaultdict(lambda: defaultdict(set))
    for node in calls:
        for path, cls in module_stack(node):
            m = _INDEXED.match(path)
            if m:
                seen[m.group(1)][int(m.group(2))].add(_cls_name(cls))
    block_lists = set()
    for list_path, by_index in seen.items():
        classes = set().union(*by_index.values())
        if len(by_index) >= 2 and len(classes) == 1:
            block_lists.add(list_path)
    if not block_lists:
        return []
    blocks: dict = {}
    for node in calls:
        for path, cls in module_stack(node):  # outermost first
            m = _INDEXED.match(path)
            if m and m.group(1) in block_lists:
                block = blocks.get(path)
                if block is None:
                    block = blocks[path] = Block(path, m.group(1), int(m.group(2)), _cls_name(cls))
                block.nodes.append(node)
                break
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(blocks.values(), key=lambda b: order[b.first])

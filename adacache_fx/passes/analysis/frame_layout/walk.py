"""Follow the frame axis of a video input through the graph, in graph order."""
from __future__ import annotations

import operator

import sympy
import torch.fx as fx

from ..graph_nodes import example_value
from .axis import FrameAxis, fits, size_expr
from .rules import propagate, split_elements


def follow_frame_axis(graph: fx.Graph, video: fx.Node, frame_dim: int, start: FrameAxis = None) -> dict:
    """Layouts of every node that the frame axis of ``video`` (at ``frame_dim``, or the given
    ``start`` layout: packed tokens) reaches."""
    value = example_value(video)
    layouts = {video: start or FrameAxis(frame_dim, sympy.Integer(1), size_expr(value.shape[frame_dim]))}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node in layouts:
            continue
        for arg in node.all_input_nodes:
            if arg not in layouts:
                continue
            src_val = example_value(arg)
            if isinstance(src_val, (tuple, list)):  # chunk/split: the getitem below inherits
                continue
            if isinstance(example_value(node), (tuple, list)):
                new = split_elements(node, layouts[arg], src_val, arg)
            else:
                new = propagate(node, layouts[arg], arg)
            if isinstance(new, list) or (new is not None and fits(example_value(node), new)):
                layouts[node] = new
            break
        if node not in layouts and node.op == "call_function" and node.target is operator.getitem:
            parent = node.args[0]
            if isinstance(parent, fx.Node) and parent in layouts and isinstance(example_value(parent), (tuple, list)):
                inherited = layouts[parent]
                if isinstance(inherited, list):
                    k = node.args[1]
                    inherited = inherited[k] if isinstance(k, int) and -len(inherited) <= k < len(inherited) else None
                if inherited is not None:
                    layouts[node] = inherited
    return {n: a for n, a in layouts.items() if isinstance(a, FrameAxis)}

"""Where the frame axis is lost on its way to the probe, for the MoReg-off message.

The one loss worth a warning is a *shard* that the sharded motion score cannot handle: a
chunk / split / slice along the frame-token dim whose piece holds part of a frame, or part of
the video tokens of a joint text + video sequence (a sequence- or context-parallel split hook).
Equal pieces of whole frames keep MoReg (``FrameAxis.shard``: the runtime adds the frame pairs
across the shard boundary); these do not, so MoReg is off, and the user should know that the
decisions differ from a single-process run's on high-motion videos.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ..graph_nodes import ancestors, describe_node, example_value
from .walk import follow_frame_axis

_SPLITS = ("chunk", "split", "tensor_split", "narrow")


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def axis_stops(graph: fx.Graph, video: fx.Node, frame_dim: int, target: fx.Node) -> list:
    """The nodes on the way to ``target`` that the frame axis of ``video`` reaches an input of
    but not the node itself (a getitem of a split counts with the split's inputs), graph order."""
    layouts = follow_frame_axis(graph, video, frame_dim)
    on_path = ancestors(target) | {target}

    def reached(arg: fx.Node) -> bool:
        if arg in layouts:
            return True
        return isinstance(example_value(arg), (tuple, list)) and any(a in layouts for a in arg.all_input_nodes)

    return [n for n in graph.nodes if n in on_path and n not in layouts and n.op != "placeholder"
            and any(reached(a) for a in n.all_input_nodes)]


def is_shard(node: fx.Node) -> bool:
    """A piece of a chunk / split / narrow, or a slice: keeps part of its input's tokens."""
    if _name(node) in _SPLITS:
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        parent = node.args[0]
        return _name(parent) in _SPLITS or isinstance(node.args[1], slice) or (
            isinstance(node.args[1], tuple) and any(isinstance(i, slice) for i in node.args[1]))
    return False


def shard_message(graph: fx.Graph, video: fx.Node, frame_dim: int, target: fx.Node, video_name: str):
    """The MoReg-off reason when the frame axis is lost at a shard on the way to ``target``
    (None when it is lost elsewhere)."""
    shards = [n for n in axis_stops(graph, video, frame_dim, target) if is_shard(n)]
    if not shards:
        return None
    return (f"the frame axis of input {video_name!r} stops at {describe_node(shards[0])}: a piece of a split that "
            "holds only part of the video's tokens (a sequence- or context-parallel shard) but not whole frames "
            "of a video-only sequence; sharded MoReg needs each shard to hold whole frames (shard the sequence "
            "before text tokens join it, into a frame count divisible by the degree): MoReg off, so on "
            "high-motion videos decisions can differ from a single-process run's")

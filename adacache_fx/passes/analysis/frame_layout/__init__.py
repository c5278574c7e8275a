"""Infer where the frame axis of a video lives inside the probe residual (for MoReg).

The frame axis of a 5-D video input is followed through the graph (``walk``) with one rule
per op kind (``rules``) in sympy size algebra (``axis``). Video tokens that arrive packed,
``(B, F*H*W, C)`` frame-major, start the walk with ``F`` given (``AdaCacheConfig.frames_arg``,
read from the call's arguments): frame ``i // (N / F)`` along dim 1. The probe residual then views as
``(-1, frames, inner * prod(trailing dims))`` (narrowed to the video tokens when text tokens
sit beside them). A split of the frame tokens into equal pieces of whole frames (sequence or
context parallelism) gives each rank's piece a sharded axis (``FrameAxis.shard``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy
import torch
import torch.fx as fx

from ..graph_nodes import ancestors, example_value, is_parameter_placeholder, numel_hint, size_hint, user_placeholder_name
from ..reasons import FRAME_AXIS, MOREG_OFF, Reason
from .axis import FrameAxis, size_expr
from .walk import follow_frame_axis

__all__ = ["FrameAxis", "FrameLayout", "find_packed_inputs", "find_video_inputs", "follow_frame_axis",
           "infer_frame_layout"]


@dataclass
class FrameLayout:
    """The frame axis of the probe, and where it came from."""

    video_input: str           # graph input name
    video_frame_dim: int       # frame dim of the 5-D input (1 for packed tokens)
    probe_axis: FrameAxis      # layout of the probe residual
    packed: bool = False       # the input is packed tokens (B, F*H*W, C) with F from frames_arg

    def describe(self) -> str:
        a = self.probe_axis
        segment = f", video tokens [{a.offset}, {a.offset} + {a.span})" if a.offset != 0 or a.span is not None else ""
        if a.gather is not None:
            segment += f", video tokens at the positions input {user_placeholder_name(a.gather)!r} holds"
        source = (f"packed tokens of input {self.video_input!r} (frames from frames_arg or packed_frames)" if self.packed
                  else f"input {self.video_input!r} dim {self.video_frame_dim}")
        shard = ""
        if a.shard is not None:
            index, count = a.shard[:2]
            shard = (f", shard {index} of {count} along the frames (this rank's frames; the frame pairs across a "
                     "shard boundary come from the neighbour rank on computed steps)")
        return (f"frames from {source}; probe dim {a.dim}, "
                f"inner stride {a.inner}, {a.frames} frames{segment}{shard}")


def find_video_inputs(graph: fx.Graph) -> list:
    """The 5-D graph inputs, largest first (a model may take several: Wan-Animate's face video).
    Sizes by their hints: ``int()`` on a SymInt would specialise a dynamic shape."""
    videos = [n for n in graph.nodes if n.op == "placeholder" and not is_parameter_placeholder(n)
              and isinstance(example_value(n), torch.Tensor) and example_value(n).dim() == 5]
    return sorted(videos, key=lambda n: -numel_hint(example_value(n)))


def find_packed_inputs(graph: fx.Graph, frames: int) -> list:
    """3-D float graph inputs ``(B, N, C)`` whose token count ``N`` splits into ``frames``, largest
    first: the candidates for packed video tokens."""
    def fits(v):
        return (isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point()
                and size_hint(v.shape[1]) > frames and size_hint(v.shape[1]) % frames == 0)
    packed = [n for n in graph.nodes if n.op == "placeholder" and not is_parameter_placeholder(n)
              and fits(example_value(n))]
    return sorted(packed, key=lambda n: -numel_hint(example_value(n)))


def _packed_layout(graph: fx.Graph, probe: fx.Node, frames: int, reasons: Optional[list],
                   streams: Optional[list] = None) -> Optional[FrameLayout]:
    # the tokens the streams come from first: another (B, N, C) input of the same token count
    # (a rotary table) may reach the probe too, with the same axis but a misleading name
    sources = {n for s in streams or [] for n in ancestors(s) | {s} if n.op == "placeholder"}
    for video in sorted(find_packed_inputs(graph, frames), key=lambda n: n not in sources):
        tokens = size_expr(example_value(video).shape[1])
        start = FrameAxis(1, sympy.simplify(tokens / frames), sympy.Integer(frames))
        axis = follow_frame_axis(graph, video, 1, start).get(probe)
        if axis is not None:
            return FrameLayout(user_placeholder_name(video), 1, axis, packed=True)
    if reasons is not None:
        reasons.append(Reason(MOREG_OFF, f"frames_arg gives {frames} frames, but no packed (B, N, C) input with N "
                          "divisible by it reaches the probe: MoReg off"))
    return None


def infer_frame_layout(graph: fx.Graph, probe: fx.Node, frame_dim: Optional[int] = None,
                       reasons: Optional[list] = None, packed_frames: Optional[int] = None,
                       streams: Optional[list] = None) -> Optional[FrameLayout]:
    """Frame layout of ``probe``, or None (image model, or the axis was lost on the way).
    ``packed_frames``: the frame count of packed video tokens, when the model takes no 5-D video;
    ``streams``: the regions' stream inputs (the packed input they come from is preferred);
    ``reasons`` gets a ``Reason`` where MoReg is off, or a choice was made."""
    videos = find_video_inputs(graph)
    if not videos and packed_frames is not None and packed_frames > 1:
        return _packed_layout(graph, probe, packed_frames, reasons, streams)
    if not videos:
        if reasons is not None:
            reasons.append(Reason(MOREG_OFF, "no 5-D video input: image model, MoReg off"))
        return None
    dims = [frame_dim % 5] if frame_dim is not None else [2, 1]
    found = []
    for video in videos:   # the largest 5-D input whose frame axis reaches the probe
        for dim in dims:
            axis = follow_frame_axis(graph, video, dim).get(probe)
            if axis is not None and (axis.frames != 1 or axis.shard is not None):   # one frame per shard: fine
                found.append(FrameLayout(user_placeholder_name(video), dim, axis))
        if found:
            break
    if not found:
        if reasons is not None:
            reasons.append(Reason(MOREG_OFF, f"frame axis of input {user_placeholder_name(videos[0])!r} does not reach the "
                              "probe: MoReg off"))
        return None
    if len(found) > 1:
        # Both dims reach the probe only when neither is the channel dim, which a patch embedding
        # mixes: (B, F, H, W, C) channels last, whose dim 2 is the height. Dim 1 is the frames.
        if reasons is not None:
            reasons.append(Reason(FRAME_AXIS, "frame axis ambiguous between input dims 2 and 1 (channels last); took "
                              "dim 1", todo="set video_frame_dim to override"))
        return next(f for f in found if f.video_frame_dim == 1)
    return found[0]

"""Infer where the frame axis of a video lives inside the probe residual (for MoReg).

The frame axis of a 5-D video input is followed through the graph (``walk``) with one rule
per op kind (``rules``) in sympy size algebra (``axis``). The probe residual then views as
``(-1, frames, inner * prod(trailing dims))`` (narrowed to the video tokens when text tokens
sit beside them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..graph_nodes import example_value, is_parameter_placeholder, numel_hint, user_placeholder_name
from .axis import FrameAxis
from .walk import follow_frame_axis

__all__ = ["FrameAxis", "FrameLayout", "find_video_inputs", "follow_frame_axis", "infer_frame_layout"]


@dataclass
class FrameLayout:
    """The frame axis of the probe, and where it came from."""

    video_input: str           # graph input name
    video_frame_dim: int       # frame dim of the 5-D input
    probe_axis: FrameAxis      # layout of the probe residual

    def describe(self) -> str:
        a = self.probe_axis
        segment = f", video tokens [{a.offset}, {a.offset} + {a.span})" if a.segmented else ""
        return (f"frames from input {self.video_input!r} dim {self.video_frame_dim}; probe dim {a.dim}, "
                f"inner stride {a.inner}, {a.frames} frames{segment}")


def find_video_inputs(graph: fx.Graph) -> list:
    """The 5-D graph inputs, largest first (a model may take several: Wan-Animate's face video).
    Sizes by their hints: ``int()`` on a SymInt would specialise a dynamic shape."""
    videos = [n for n in graph.nodes if n.op == "placeholder" and not is_parameter_placeholder(n)
              and isinstance(example_value(n), torch.Tensor) and example_value(n).dim() == 5]
    return sorted(videos, key=lambda n: -numel_hint(example_value(n)))


def infer_frame_layout(graph: fx.Graph, probe: fx.Node, frame_dim: Optional[int] = None,
                       log: Optional[list] = None) -> Optional[FrameLayout]:
    """Frame layout of ``probe``, or None (image model, or the axis was lost on the way)."""
    videos = find_video_inputs(graph)
    if not videos:
        if log is not None:
            log.append("no 5-D video input: image model, MoReg off")
        return None
    dims = [frame_dim % 5] if frame_dim is not None else [2, 1]
    found = []
    for video in videos:   # the largest 5-D input whose frame axis reaches the probe
        for dim in dims:
            axis = follow_frame_axis(graph, video, dim).get(probe)
            if axis is not None and axis.frames != 1:
                found.append(FrameLayout(user_placeholder_name(video), dim, axis))
        if found:
            break
    if not found:
        if log is not None:
            log.append(f"frame axis of input {user_placeholder_name(videos[0])!r} does not reach the probe: MoReg off")
        return None
    if len(found) > 1 and log is not None:
        log.append("frame axis ambiguous between input dims 2 and 1; took dim 2 (set video_frame_dim to override)")
    return found[0]

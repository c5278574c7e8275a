"""Choose the guard of a model compiled by ``compile_model``: inside Dynamo's graphs, or at the
block lists' calls (``runtime/module_guard.py``), found out on the first call, not named by hand.

A graph-level region needs a Dynamo graph that holds whole blocks. When Dynamo cannot trace a
block in one piece (a Python loop over ``.tolist()`` values in every block, a block-diagonal mask
built from a list of lengths, expert routing), it breaks the model's graph at the block's call
and compiles the block's own ``forward`` as a frame of its own, in pieces: those pieces are the
first graphs whose parameters are rooted at a block, not at the model. The backend recognises
such a graph when it is handed to it, before it is compiled or run
(:func:`block_frame_graph`), and ``compile_model`` switches the model to the module guard then:
nothing the backend compiled runs again under another backend, so no frame is recompiled.

    graph of the model's frame           parameters "blocks.0.attn.weight", ...   -> graph guard
    graph of a block's own frame         parameters "attn.weight", ... (a block's) -> module guard
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .find_module_blocks import block_containers

__all__ = ["BlockFrames", "GuardChoice", "block_frame_graph"]


@dataclass(frozen=True)
class GuardChoice:
    """Which guard a model got and why (``backend.guard_choices``, ``explain``)."""

    model: str          # the model's class name
    guard: str          # "graph" or "modules"
    why: str


class BlockFrames:
    """The candidate blocks of one model (``find_module_blocks.block_containers``), to tell a
    graph of a block's own frame from a graph of the model's."""

    def __init__(self, model: torch.nn.Module):
        self.model_name = type(model).__name__
        self.model_paths = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        self.members = [(path, member) for members in block_containers(model).values() for path, member in members]
        self._relative = [(path, {name for name, _ in member.named_parameters()}) for path, member in self.members]

    def __bool__(self) -> bool:
        return bool(self.members)


class BlockGraphBreak(Exception):
    """Raised by the backend (through Dynamo) when a model under ``block_guard="auto"`` breaks its
    graph inside its blocks: ``compile_model`` then guards it at the block lists' calls."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def block_frame_graph(gm: fx.GraphModule, frames: BlockFrames) -> Optional[str]:
    """Why ``gm`` is a piece of a block's own frame (its parameters are named from a block of
    ``frames``, none from the model), or None when it is not (the model's frame, or no
    parameter to tell)."""
    names = list((gm.meta.get("dynamo_flat_name_to_original_fqn") or {}).values())
    if not names or any(name in frames.model_paths for name in names):
        return None
    for path, relative in frames._relative:
        if all(name in relative for name in names):
            block = dict(frames.members)[path]
            return (f"Dynamo breaks the graph inside the blocks of {frames.model_name} (a piece of "
                    f"{type(block).__name__}.forward was compiled as a frame of its own: no graph holds a whole "
                    "block)")
    return None

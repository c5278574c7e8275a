"""Trace each repeated block once: the blocks of a model's module lists marked as nested compile
regions while ``compile_model`` compiles it.

Dynamo inlines every block of a 30-block forward into the graph, bytecode by bytecode: at the
Wan 2.1 1.3B size its trace alone took 14.1 s on this project's CPU (one thread), against 5.8 s
with each block a ``torch.compiler.nested_compile_region`` (Dynamo traces block 0 and stamps its
graph out for the others, one ``invoke_subgraph`` per block). The backend inlines those bodies
again before its analysis (``passes/inline_subgraphs.py``): the graph it rewrites is the one it
saw before, and ``compile/compile_blocks.py`` compiles one block for all.

Why a subclass per block class, not a wrapped ``forward`` per instance: Dynamo reuses a region's
trace by the region function's inputs, and a bound method or a closure per instance hides the
module from them: torch 2.13 then stamps out block 0's weights for every block (checked: wrong
outputs). The class's own function, called with the module as ``self``, lifts each block's
weights as inputs. The subclass keeps the class's name, module and qualified name; only the
marked instances get it, and :meth:`BlockRegions.remove` gives them their class back.

A block that breaks Dynamo's graph cannot be a region (Dynamo raises
``UncapturedHigherOrderOpError``): ``compile_model`` then removes the marks and traces again,
inlining every block as before. A member whose ``forward`` is set on the instance (a hook) is
left unmarked: its own forward is what runs.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
from torch._dynamo.exc import UncapturedHigherOrderOpError

from .compile.compile_blocks import COMPILE_ONCE_MIN_BLOCKS
from .errors import find_in_chain
from .passes.analysis.find_module_blocks import block_containers

logger = logging.getLogger("adacache_fx")

__all__ = ["BlockRegions", "min_blocks_for", "region_failed"]

_REGION_OF = "_adacache_region_of"    # on a marked subclass: the class it marks
_MARKED: dict = {}                     # class -> its marked subclass (one per class, shared by models)


def _marked_class(cls: type, max_reuse: int) -> type:
    marked = _MARKED.get(cls)
    if marked is None:
        forward = torch.compiler.nested_compile_region(cls.forward, max_reuse_entries=max_reuse)
        forward.__wrapped__ = cls.forward   # inspect.signature and diffusers' hooks read the real one
        marked = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__, _REGION_OF: cls})
        _MARKED[cls] = marked
    return marked


class BlockRegions:
    """The members of ``model``'s repeated module lists with at least ``min_blocks`` members, marked
    as nested compile regions (their class swapped for a marked subclass of it)."""

    def __init__(self, model: nn.Module, min_blocks: int):
        self.marked: list = []   # (member, its own class)
        for members in block_containers(model).values():
            if len(members) < min_blocks:
                continue
            for _path, member in members:
                cls = type(member)
                if "forward" in member.__dict__ or _REGION_OF in cls.__dict__:
                    continue
                # one trace per distinct block input: at worst one per block, never an error
                member.__class__ = _marked_class(cls, max(8, len(members)))
                self.marked.append((member, cls))
        if self.marked:
            logger.debug("adacache: %d blocks marked as nested compile regions", len(self.marked))

    def __bool__(self) -> bool:
        return bool(self.marked)

    def remove(self) -> None:
        """Every marked member gets its own class back."""
        for member, cls in self.marked:
            if type(member) is _MARKED.get(cls):
                member.__class__ = cls
        self.marked = []


def min_blocks_for(compile_blocks: str) -> Optional[int]:
    """How many members a module list needs for its blocks to be traced once under
    ``AdaCacheConfig.compile_blocks`` (None: never)."""
    return {"once": 2, "auto": COMPILE_ONCE_MIN_BLOCKS}.get(compile_blocks)


def region_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is Dynamo failing to trace a nested compile region (a graph break inside a
    block: Dynamo cannot stamp it out)."""
    return find_in_chain(exc, UncapturedHigherOrderOpError) is not None

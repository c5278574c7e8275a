"""Why the analysis did not cache something, as data: what stopped it, at which graph node and
source line of the model, and what the user can do. The warnings, ``explain`` and
``GraphAnalysis.why_uncacheable`` are made from these, not from the log's text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

NO_BLOCKS = "no block stack"
BLOCK_LEFT_UNCACHED = "block left uncached"
NO_PROBE = "no probe"
MOREG_OFF = "MoReg off"
FRAME_AXIS = "frame axis"   # a choice the frame-layout inference made (not a stop)


@dataclass(frozen=True)
class Reason:
    kind: str                     # one of the kinds above
    message: str                  # what happened, in the model's terms
    node: Optional[str] = None    # the graph node that stopped the pass
    op: Optional[str] = None      # that node's op
    source: Optional[str] = None  # the line of the model's source that made the node (Dynamo's trace)
    todo: str = ""                # what the user can do

    @classmethod
    def at(cls, kind: str, message: str, node: Optional[fx.Node] = None, todo: str = "") -> "Reason":
        if node is None:
            return cls(kind, message, todo=todo)
        return cls(kind, message, node.name, getattr(node.target, "__name__", str(node.target)), _source_line(node),
                   todo)

    def __str__(self) -> str:
        where = f" (model source: {self.source})" if self.source else ""
        return self.message + where + (f"; {self.todo}" if self.todo else "")


def _source_line(node: fx.Node) -> Optional[str]:
    """The innermost frame of the model's source Dynamo recorded for ``node`` ("file:line, code")."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    files = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
    if not files:
        return None
    i = files[-1]
    where = lines[i][len("File "):].replace('"', "")
    code = lines[i + 1] if i + 1 < len(lines) else ""
    return f"{where}: {code}" if code else where

"""The probe of the module guard: one residual branch of one block, found at run time.

Under the graph guard the probe is a node of the graph: the ``probe_branch``-th residual added to
the probe block's stream (``passes/analysis/find_residual_chain.py``; 0 is the attention's, as in
the AdaCache paper). The module guard sees blocks only at their calls, so it runs the probe block's
own (eager) forward under :class:`StreamResidual`, a dispatch mode that follows the stream through
the block: every ``add`` with the current stream value as an operand and a result of its shape is
one link of the residual chain, its other operand the branch's residual, and its result the
stream from then on. One block of the stack runs eagerly on computed steps; the others run their
compiled forward.

    x1 = x + gate_msa * attn(...)     branch 0: gate_msa * attn(...)
    x2 = x1 + cross_attn(x1, y)       branch 1
    x3 = x2 + gate_mlp * mlp(...)     branch 2
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StreamResidual", "run_with_residual"]

_aten = torch.ops.aten
_ADDS = {_aten.add.Tensor, _aten.add_.Tensor}
_FOLLOW = {_aten._to_copy.default, _aten.clone.default}   # the stream, converted or copied, is still the stream


class StreamResidual(TorchDispatchMode):
    """Within: per stream (``streams``: key -> the tensor a block receives), the ``branch``-th residual
    added to it (``residuals``, copies; a stream the block adds fewer to has none). Several
    streams are followed at once where it is not known yet which input a block continues (the
    observed first call)."""

    def __init__(self, streams: dict, branch: int):
        super().__init__()
        self.current = dict(streams)
        self.links = {key: 0 for key in streams}
        self.branch = branch
        self.residuals: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.current or not isinstance(out, torch.Tensor) or len(args) < 1:
            return out
        for key, value in self.current.items():
            if func in _FOLLOW and args[0] is value and out.shape == value.shape:
                self.current[key] = out
                break
            if func in _ADDS and len(args) >= 2 and (args[0] is value or args[1] is value):
                other = args[1] if args[0] is value else args[0]
                if isinstance(other, torch.Tensor) and out.shape == value.shape:
                    if self.links[key] == self.branch:
                        alpha = kwargs.get("alpha", 1)
                        residual = other if alpha == 1 else other * alpha
                        self.residuals[key] = residual.detach().expand(out.shape).clone()
                    self.links[key] += 1
                    self.current[key] = out
                break
        return out


def run_with_residual(forward, stream: Optional[torch.Tensor], branch: int, args: tuple, kwargs: dict) -> tuple:
    """``(output, residual or None)``: ``forward(*args, **kwargs)`` with its ``branch``-th residual on ``stream``."""
    if stream is None:
        return forward(*args, **kwargs), None
    with StreamResidual({0: stream}, branch) as recorder:
        output = forward(*args, **kwargs)
    return output, recorder.residuals.get(0)

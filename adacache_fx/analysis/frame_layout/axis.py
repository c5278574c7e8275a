"""The frame axis of a tensor and the size algebra it is computed in.

``FrameAxis(dim, inner, frames)`` says that element ``i`` along ``dim`` belongs to frame
``(i // inner) % frames``. Sizes are sympy expressions (Dynamo's SymInts), so the layout
holds under dynamic shapes; ``same`` and ``exact_quotient`` are the only comparisons the
rules make.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy
import torch


@dataclass(frozen=True)
class FrameAxis:
    """Element ``i`` along ``dim`` belongs to frame ``((i - offset) // inner) % frames``, for
    ``offset <= i < offset + span`` (``span`` None: to the end of the dim). The offset and
    span come from a cat along ``dim`` (text tokens before or after the video tokens); a
    slice or split back to the video tokens removes them."""

    dim: int
    inner: sympy.Expr
    frames: sympy.Expr
    offset: sympy.Expr = sympy.Integer(0)
    span: Optional[sympy.Expr] = None

    @property
    def segmented(self) -> bool:
        return self.offset != 0 or self.span is not None

    def extent(self, size: sympy.Expr) -> sympy.Expr:
        """Length of the video segment in a dim of ``size`` elements."""
        return self.span if self.span is not None else size - self.offset


def size_expr(size) -> sympy.Expr:
    """A tensor size (int or SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return _cancel_exact_floordivs(size.node.expr)
    return sympy.Integer(int(size))


def shape_exprs(value) -> list:
    return [size_expr(s) for s in value.shape]


def _cancel_exact_floordivs(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite ``FloorDiv(a, b)`` as ``a / b`` where ``b`` divides ``a`` symbolically.

    Shape propagation can leave sizes such as ``(s0**2 * h) // s0`` (a linear's output
    when dynamo duck-sizes batch and frames to one symbol), which equal ``s0 * h`` but do not
    compare equal to it; cancelling makes equal sizes equal expressions."""
    from torch.utils._sympy.functions import FloorDiv

    def cancel(a, b):
        numerator, denominator = sympy.fraction(sympy.cancel(a / b))
        return numerator if denominator == 1 else FloorDiv(a, b)

    return expr.replace(lambda e: isinstance(e, FloorDiv), lambda e: cancel(*e.args))


def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Whether two sizes are equal for every value of their symbols."""
    return sympy.simplify(a - b) == 0


def product(sizes) -> sympy.Expr:
    out = sympy.Integer(1)
    for s in sizes:
        out = out * s
    return out


def exact_quotient(a: sympy.Expr, b: sympy.Expr) -> Optional[sympy.Expr]:
    """``a / b`` if it is exactly an integer expression, else None."""
    if b == 0:
        return None
    q = sympy.simplify(a / b)
    return q if q.is_integer else None


def nonnegative(expr: sympy.Expr) -> bool:
    return bool(expr.is_nonnegative) or (expr.is_number and expr >= 0)


def window(axis: FrameAxis, start, length, size, dim: int) -> Optional[FrameAxis]:
    """The axis within elements ``[start, start + length)`` of its dim (a slice, or one piece of
    a split) now at ``dim``; None when the video segment does not lie inside them."""
    offset = sympy.simplify(axis.offset - start)
    span = axis.extent(size)
    if not nonnegative(offset) or not nonnegative(sympy.simplify(length - offset - span)):
        return None
    if offset == 0 and same(length, span):
        return FrameAxis(dim, axis.inner, axis.frames)
    return FrameAxis(dim, axis.inner, axis.frames, offset, span)


def fits(value, axis: FrameAxis) -> bool:
    """Whether ``axis`` is consistent with the size of ``value``'s dim."""
    if not isinstance(value, torch.Tensor):
        return True
    return exact_quotient(axis.extent(size_expr(value.shape[axis.dim])), axis.inner * axis.frames) is not None

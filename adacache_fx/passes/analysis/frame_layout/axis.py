"""The frame axis of a tensor and the size algebra it is computed in.

``FrameAxis(dim, inner, frames)`` says that element ``i`` along ``dim`` belongs to frame
``(i // inner) % frames``. Sizes are sympy expressions (Dynamo's SymInts), so the layout
holds under dynamic shapes; ``same`` and ``exact_quotient`` are the only comparisons the
rules make.

A *shard* is one of ``count`` equal pieces of a frame dim, each holding whole frames (a
sequence- or context-parallel split: ``x.chunk(P, dim)[rank]``): the piece's axis counts its
own ``frames`` and says which piece it is (``shard=(index, count, total, inner)``), so that the runtime can
add the frame pairs that cross a shard boundary (``runtime.collectives.shard_boundary_sums``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import sympy
import torch


@dataclass(frozen=True)
class FrameAxis:
    """Element ``i`` along ``dim`` belongs to frame ``((i - offset) // inner) % frames``, for
    ``offset <= i < offset + span`` (``span`` None: to the end of the dim). The offset and
    span come from a cat along ``dim`` (text tokens before or after the video tokens); a
    slice or split back to the video tokens removes them. ``gather``: the video tokens are not
    a run of the segment but its elements at the positions a graph input of indices holds, in
    frame-major order (tokens scattered into a packed sequence with ``index_copy``: MiniMax-H3);
    the runtime selects them (``index_select``) before viewing the frames."""

    dim: int
    inner: sympy.Expr
    frames: sympy.Expr
    offset: sympy.Expr = sympy.Integer(0)
    span: Optional[sympy.Expr] = None
    shard: Optional[tuple] = None   # (index, count, total, inner): piece ``index`` of ``count`` equal
                                    # shards of the frames, of a dim of ``total`` elements, ``inner`` per frame
    gather: Optional[object] = None  # the placeholder fx.Node of the positions, or None

    @property
    def segmented(self) -> bool:
        """The video tokens are part of the dim only (an offset, a span or gathered positions)."""
        return self.offset != 0 or self.span is not None or self.gather is not None

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


def window(axis: FrameAxis, start, length, size, dim: int, shard: Optional[tuple] = None) -> Optional[FrameAxis]:
    """The axis within elements ``[start, start + length)`` of its dim (a slice, or one piece of
    a split: ``shard=(index, count)``) now at ``dim``; when the video segment does not lie inside
    them, the piece as a shard of the frames (``_shard``), or None."""
    offset = sympy.simplify(axis.offset - start)
    span = axis.extent(size)
    if not nonnegative(offset) or not nonnegative(sympy.simplify(length - offset - span)):
        return _shard(axis, start, length, size, dim, shard)
    if offset == 0 and same(length, span):
        return replace(axis, dim=dim, offset=sympy.Integer(0), span=None)
    return replace(axis, dim=dim, offset=offset, span=span)


def _shard(axis: FrameAxis, start, length, size, dim: int, piece: Optional[tuple]) -> Optional[FrameAxis]:
    """Elements ``[start, start + length)`` as piece ``index`` of ``count`` equal shards of the
    frames (``piece`` from a split; for a slice, from the sizes), when the axis fills its dim
    with whole frames (no text tokens beside them, not already a shard); else None.

    Under dynamic shapes a chunk's piece is ``ceil(N / P)`` in sympy, so whole frames per piece
    are not provable here: the axis keeps the piece's own length (consistent with the sizes that
    follow) and the split dim's size ``N`` and frame size, from which the runtime decides per call,
    alike on every rank, whether the shards hold whole frames (``CachedGraph._frame_view``)."""
    if axis.segmented or axis.shard is not None or not same(size, axis.inner * axis.frames):
        return None
    if piece is None:
        count, index = exact_quotient(size, length), exact_quotient(start, length)
        if count is None or index is None or not (count.is_number and index.is_number):
            return None
        piece = (int(index), int(count))
    index, count = piece
    if count < 2 or not 0 <= index < count:
        return None
    frames = sympy.simplify(length / axis.inner)
    if (frames.is_number and not frames.is_integer) or (size.is_number and not same(length * count, size)):
        return None
    return replace(axis, dim=dim, frames=frames, shard=(index, count, size, axis.inner))


def fits(value, axis: FrameAxis) -> bool:
    """Whether ``axis`` is consistent with the size of ``value``'s dim."""
    if not isinstance(value, torch.Tensor):
        return True
    if axis.gather is not None:   # the gathered positions hold the video tokens
        from ..graph_nodes import example_value
        positions = example_value(axis.gather)
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
            return False
        return same(size_expr(positions.shape[0]), axis.inner * axis.frames)
    return exact_quotient(axis.extent(size_expr(value.shape[axis.dim])), axis.inner * axis.frames) is not None

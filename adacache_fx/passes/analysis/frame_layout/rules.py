"""Per-op rules: where the frame axis of an op's input lands in its output.

Reshapes preserve the logical element order, so the frame atom keeps its flat stride;
permutes move it; a cat along it puts the video tokens at an offset and a slice or split
back removes it; convolutions keep it on batch and spatial dims (a temporal patch shrinks
``frames``) and lose it on channels; linears and attention keep it off the last dim; A @ B
keeps B's last dim; anything else keeps it when the dim survives (right-aligned
broadcasting); an ``index_copy`` of the video tokens into a packed sequence at positions given by a
graph input gathers it. ``propagate`` dispatches on ``graph_nodes.op_kind``; a rule returns
``NotImplemented`` to leave the node to the broadcasting rule.

Example (Open-Sora-style, ``x: (B, C, T, H, W)``)::

    conv3d -> (B, C', T, h, w)        FrameAxis(dim=2, inner=1,   frames=T)
    flatten(2) -> (B, C', T*h*w)      FrameAxis(dim=2, inner=h*w, frames=T)
    transpose(1, 2) -> (B, T*h*w, C') FrameAxis(dim=1, inner=h*w, frames=T)
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import Optional

import sympy
import torch
import torch.fx as fx

from ..graph_nodes import example_value, op_kind
from .axis import FrameAxis, exact_quotient, product, same, shape_exprs, size_expr, window


def _reshape(node, axis: FrameAxis, source, in_shape, out_shape):
    if node.args[0] is not source:
        return NotImplemented
    if axis.segmented:
        # only reshapes that keep the dim itself (merge/split dims before it, or after it)
        trailing = product(in_shape[axis.dim + 1:])
        for j in range(len(out_shape)):
            if same(out_shape[j], in_shape[axis.dim]) and same(product(out_shape[j + 1:]), trailing):
                return replace(axis, dim=j)
        return None
    flat_inner = axis.inner * product(in_shape[axis.dim + 1:])
    for j in range(len(out_shape)):
        sub = exact_quotient(flat_inner, product(out_shape[j + 1:]))
        if sub is not None and exact_quotient(out_shape[j], sub * axis.frames) is not None:
            return replace(axis, dim=j, inner=sub)
    return None


def _permutation(node: fx.Node, ndim: int) -> Optional[list]:
    """new dim i <- old dim perm[i]"""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = list(node.args[1:])
    try:
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            return [int(d) % ndim for d in dims]
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = int(args[0]) % ndim, int(args[1]) % ndim
            perm = list(range(ndim))
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        if name == "t":
            return list(range(ndim))[::-1]
        if name == "movedim":
            src = [args[0]] if isinstance(args[0], int) else list(args[0])
            dst = [args[1]] if isinstance(args[1], int) else list(args[1])
            src, dst = [s % ndim for s in src], [d % ndim for d in dst]
            perm = [None] * ndim
            for s, d in zip(src, dst):
                perm[d] = s
            rest = iter([i for i in range(ndim) if i not in src])
            return [p if p is not None else next(rest) for p in perm]
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _permute(node, axis: FrameAxis, source, in_shape, out_shape):
    if node.args[0] is not source:
        return NotImplemented
    perm = _permutation(node, len(in_shape))
    if perm is None or axis.dim not in perm:
        return None
    return replace(axis, dim=perm.index(axis.dim))


def _cat(node, axis: FrameAxis, source, in_shape, out_shape):
    """cat along the frame dim puts the video tokens at an offset; along another dim the
    frame dim keeps its size and layout."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    cat_dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(cat_dim, int):
        return None
    cat_dim %= len(out_shape)
    if cat_dim != axis.dim:
        if len(out_shape) != len(in_shape) or not same(out_shape[axis.dim], in_shape[axis.dim]):
            return None
        return axis
    if [t is source for t in tensors].count(True) != 1:
        return None
    before = sympy.Integer(0)
    for t in tensors:
        if t is source:
            break
        value = example_value(t) if isinstance(t, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            return None
        before = before + size_expr(value.shape[cat_dim])
    return replace(axis, offset=axis.offset + before, span=axis.extent(in_shape[axis.dim]))


def _index_copy(node, axis: FrameAxis, source, in_shape, out_shape):
    """``x.index_copy(dim, index, src)``: ``src``'s tokens land in ``x`` at the positions ``index``
    (a graph input) along ``dim``: a gathered axis. Copies of other tokens into a tensor with the
    axis keep it (the model's index sets are disjoint: text, video and audio rows of one sequence)."""
    args = list(node.args) + [node.kwargs.get(k) for k in ("dim", "index", "source")[len(node.args) - 1:]]
    if len(args) < 4 or not isinstance(args[1], int):
        return None
    x, dim, index, src = args[:4]
    dim %= len(out_shape)
    if source is x and src is not source:
        return axis if len(out_shape) == len(in_shape) and all(same(a, b) for a, b in zip(out_shape, in_shape)) else None
    if (source is not src or axis.dim != dim or axis.segmented or axis.shard is not None
            or not isinstance(index, fx.Node) or index.op != "placeholder"):
        return None
    return replace(axis, gather=index)


def _slice_bound(bound, size, default) -> Optional[sympy.Expr]:
    if bound is None:
        return default
    if isinstance(bound, torch.SymInt):
        bound = size_expr(bound)
    elif isinstance(bound, int):
        bound = sympy.Integer(bound)
    else:
        return None
    if bound.is_number and bound < 0:
        bound = size + bound
    return sympy.Min(bound, size) if bound.is_number and size.is_number else bound


def _slice(node, axis: FrameAxis, in_shape, out_shape) -> Optional[FrameAxis]:
    """``x[..., a:b, ...]``: the frame dim moves with the indexing; a slice along it keeps
    the axis when the video tokens lie inside the slice."""
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
        return None
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(in_shape) - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None)))
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == axis.dim:
            if not isinstance(i, slice) or i.step not in (None, 1):
                return None
            size = in_shape[in_dim]
            start = _slice_bound(i.start, size, 0)
            stop = _slice_bound(i.stop, size, size)
            if start is None or stop is None:
                return None
            return window(axis, start, stop - start, size, out_dim)
        if isinstance(i, slice):
            out_dim += 1
        in_dim += 1
    return None


def _getitem(node, axis: FrameAxis, source, in_shape, out_shape):
    if node.args[0] is not source:
        return NotImplemented
    sliced = _slice(node, axis, in_shape, out_shape)
    return sliced if sliced is not None or axis.segmented else NotImplemented


def _conv(node, axis: FrameAxis, source, in_shape, out_shape):
    if axis.segmented:
        return None
    if axis.dim == 0:
        return axis
    if axis.dim >= 2 and axis.inner == 1 and axis.frames == in_shape[axis.dim] and axis.shard is None:
        return FrameAxis(axis.dim, axis.inner, out_shape[axis.dim])
    return None


def _last_dim(node, axis: FrameAxis, source, in_shape, out_shape):
    if node.args and node.args[0] is not source:
        return None
    return _broadcast(axis, in_shape, out_shape, last_dim_mixed=True)


def _matmul(node, axis: FrameAxis, source, in_shape, out_shape):
    if len(node.args) > 1 and node.args[1] is source:
        # A @ B keeps B's last dim (linear attention: (V K^T) Q with tokens on Q's last dim)
        last = len(in_shape) - 1
        if axis.dim == last and same(out_shape[-1], in_shape[-1]) and node.args[0] is not source:
            return replace(axis, dim=len(out_shape) - 1)
        return None
    return _last_dim(node, axis, source, in_shape, out_shape)


def _broadcast(axis: FrameAxis, in_shape, out_shape, last_dim_mixed: bool = False) -> Optional[FrameAxis]:
    """The dim survives under right-aligned broadcasting (not onto a mixed last dim)."""
    dim = axis.dim + len(out_shape) - len(in_shape)
    if dim < 0 or dim >= len(out_shape) - (1 if last_dim_mixed else 0):
        return None
    if not same(out_shape[dim], in_shape[axis.dim]):
        return None
    return replace(axis, dim=dim)


def _reduce(node, axis: FrameAxis, source, in_shape, out_shape):
    """A reduction over dims other than the frame dim keeps it (shifted left past the reduced
    dims unless ``keepdim``); over the frame dim it is lost; a full reduction loses it."""
    if not node.args or node.args[0] is not source:
        return None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    try:
        dims = {int(d) % len(in_shape) for d in dims}
    except (TypeError, ValueError):
        return None
    if axis.dim in dims:
        return None
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    dim = axis.dim if keepdim else axis.dim - sum(1 for d in dims if d < axis.dim)
    return replace(axis, dim=dim) if dim < len(out_shape) and same(out_shape[dim], in_shape[axis.dim]) else None


_RULES = {"reshape": _reshape, "permute": _permute, "cat": _cat, "conv": _conv, "index_copy": _index_copy,
          "matmul": _matmul, "last_dim": _last_dim, "reduce": _reduce}


def propagate(node: fx.Node, axis: FrameAxis, source: fx.Node) -> Optional[FrameAxis]:
    """The frame axis of ``node``'s tensor output, given ``axis`` on its input ``source``."""
    in_val, out_val = example_value(source), example_value(node)
    if not isinstance(out_val, torch.Tensor) or not isinstance(in_val, torch.Tensor):
        return None
    in_shape, out_shape = shape_exprs(in_val), shape_exprs(out_val)
    if node.op == "call_function" and node.target is operator.getitem:
        rule = _getitem
    else:
        rule = _RULES.get(op_kind(node))
    if rule is not None:
        result = rule(node, axis, source, in_shape, out_shape)
        if result is not NotImplemented:
            return result
    return _broadcast(axis, in_shape, out_shape)


def split_elements(node: fx.Node, axis: FrameAxis, src_val, source: Optional[fx.Node] = None):
    """Layout of each element of chunk/split/unbind outputs: one axis for all elements, a
    list (split along the frame dim: the piece holding the video keeps the axis), or None."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if _is_attention(node, name):
        # (out, logsumexp, ...): the output tokens are the query's (B, H, N, D), (B, H, N); ring
        # attention merges such pieces by their log-sum-exp
        return axis if node.args and node.args[0] is source else None
    if name not in ("chunk", "split", "unbind", "tensor_split"):
        return None
    default_pos = 1 if name == "unbind" else 2
    dim = node.kwargs.get("dim", node.args[default_pos] if len(node.args) > default_pos else 0)
    try:
        dim = int(dim) % src_val.dim()
    except TypeError:
        return None
    if dim == axis.dim:
        return None if name == "unbind" else _split_along_frames(node, axis, src_val)
    if name == "unbind" and dim < axis.dim:
        return replace(axis, dim=axis.dim - 1)
    return axis


_FLEX_ATTENTION = getattr(torch.ops.higher_order, "flex_attention", None)


def _is_attention(node: fx.Node, name: str) -> bool:
    """flex attention, or an attention op returning ``(out, lse, ...)`` with ``out`` shaped as its
    first argument, the query (aten's ``_scaled_dot_product_{flash,efficient,cudnn}_attention*``,
    kernels registered as custom ops)."""
    if node.target is _FLEX_ATTENTION:
        return True
    if "attention" not in name and "attn" not in name or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    pieces, query = example_value(node), example_value(node.args[0])
    return (isinstance(pieces, (tuple, list)) and bool(pieces) and isinstance(pieces[0], torch.Tensor)
            and isinstance(query, torch.Tensor) and pieces[0].shape == query.shape)


def _split_along_frames(node: fx.Node, axis: FrameAxis, src_val) -> Optional[list]:
    pieces = example_value(node)
    if not isinstance(pieces, (tuple, list)) or not all(isinstance(p, torch.Tensor) for p in pieces):
        return None
    size = size_expr(src_val.shape[axis.dim])
    out, start = [], sympy.Integer(0)
    for k, piece in enumerate(pieces):
        length = size_expr(piece.shape[axis.dim])
        out.append(window(axis, start, length, size, axis.dim, shard=(k, len(pieces))))
        start = start + length
    return out if any(a is not None for a in out) else None

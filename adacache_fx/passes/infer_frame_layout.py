"""Infer where the frame axis of a video lives inside an intermediate tensor (for MoReg).

The frame axis of the 5-D video input is followed through the graph: a layout
``FrameAxis(dim, inner, frames)`` says that element ``i`` along ``dim`` belongs to frame
``(i // inner) % frames``. Reshapes preserve the logical element order, so the frame
atom keeps its flat stride; permutes move it; convolutions keep it on batch and spatial
dims (a temporal patch shrinks ``frames``) and lose it on channels; linears and
attention keep it off the last dim; anything else keeps it when the dim survives
(right-aligned broadcasting). Sizes are sympy expressions, so the inference holds
under dynamic shapes.

Example (Open-Sora-style, ``x: (B, C, T, H, W)``)::

    conv3d -> (B, C', T, h, w)      FrameAxis(dim=2, inner=1,   frames=T)
    flatten(2) -> (B, C', T*h*w)    FrameAxis(dim=2, inner=h*w, frames=T)
    transpose(1, 2) -> (B, T*h*w, C') FrameAxis(dim=1, inner=h*w, frames=T)

The probe residual then views as ``(-1, frames, inner * prod(trailing dims))``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Optional

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import example_value, is_parameter_placeholder, numel_hint, user_placeholder_name


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


_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "contiguous"}
_RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
_PERMUTE_NAMES = {"permute", "transpose", "movedim", "swapaxes", "swapdims", "t"}
_PERMUTE_FUNCS = {torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.t}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_CONV_FUNCS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}
_MATMUL_FUNCS = {torch.matmul, torch.bmm, operator.matmul}
_LAST_DIM_FUNCS = {torch._C._nn.linear, F.linear, torch.matmul, torch.bmm, operator.matmul,
                   F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return _cancel_exact_floordivs(size.node.expr)
    return sympy.Integer(int(size))


def _cancel_exact_floordivs(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite ``FloorDiv(a, b)`` as ``a / b`` where ``b`` divides ``a`` symbolically.

    Shape propagation can leave sizes such as ``(s0**2 * h) // s0`` (a linear's output
    when dynamo duck-sizes batch and frames to one symbol), which equal ``s0 * h`` but do not
    compare equal to it; cancelling makes equal sizes equal expressions."""
    try:
        from torch.utils._sympy.functions import FloorDiv
    except ImportError:  # pragma: no cover - older torch
        return expr

    def cancel(a, b):
        numerator, denominator = sympy.fraction(sympy.cancel(a / b))
        return numerator if denominator == 1 else FloorDiv(a, b)

    return expr.replace(lambda e: isinstance(e, FloorDiv), lambda e: cancel(*e.args))


def _shape(value):
    return [_expr(s) for s in value.shape]


def _prod(sizes) -> sympy.Expr:
    out = sympy.Integer(1)
    for s in sizes:
        out = out * s
    return out


def _div(a: sympy.Expr, b: sympy.Expr) -> Optional[sympy.Expr]:
    """``a / b`` if it is exactly an integer expression, else None."""
    if b == 0:
        return None
    q = sympy.simplify(a / b)
    if q.is_integer:
        return q
    return None


def _reshape(axis: FrameAxis, in_shape, out_shape) -> Optional[FrameAxis]:
    if axis.segmented:
        # only reshapes that keep the dim itself (merge/split dims before it, or after it)
        trailing = _prod(in_shape[axis.dim + 1:])
        for j in range(len(out_shape)):
            if sympy.simplify(out_shape[j] - in_shape[axis.dim]) == 0 and \
                    sympy.simplify(_prod(out_shape[j + 1:]) - trailing) == 0:
                return replace(axis, dim=j)
        return None
    flat_inner = axis.inner * _prod(in_shape[axis.dim + 1:])
    for j in range(len(out_shape)):
        rest = _prod(out_shape[j + 1:])
        sub = _div(flat_inner, rest)
        if sub is None:
            continue
        if _div(out_shape[j], sub * axis.frames) is not None:
            return FrameAxis(j, sub, axis.frames)
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
            src, dst = args[0], args[1]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [s % ndim for s in src]
            dst = [d % ndim for d in dst]
            perm = [None] * ndim
            for s, d in zip(src, dst):
                perm[d] = s
            rest = iter([i for i in range(ndim) if i not in src])
            return [p if p is not None else next(rest) for p in perm]
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _is(node: fx.Node, funcs: set, names: set) -> bool:
    if node.op == "call_method":
        return node.target in names
    if node.op == "call_function":
        return node.target in funcs
    return False


def _propagate(node: fx.Node, axis: FrameAxis, source: fx.Node) -> Optional[FrameAxis]:
    in_val, out_val = example_value(source), example_value(node)
    if not isinstance(out_val, torch.Tensor) or not isinstance(in_val, torch.Tensor):
        return None
    in_shape, out_shape = _shape(in_val), _shape(out_val)
    if _is(node, _RESHAPE_FUNCS, _RESHAPE_METHODS) and node.args and node.args[0] is source:
        return _reshape(axis, in_shape, out_shape)
    if _is(node, _PERMUTE_FUNCS, _PERMUTE_NAMES) and node.args and node.args[0] is source:
        perm = _permutation(node, len(in_shape))
        if perm is None or axis.dim not in perm:
            return None
        return replace(axis, dim=perm.index(axis.dim))
    if _is(node, _CAT_FUNCS, set()):
        return _cat(node, axis, source, in_shape, out_shape)
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is source:
        sliced = _slice(node, axis, in_shape, out_shape)
        if sliced is not None or axis.segmented:
            return sliced
    if node.op == "call_function" and node.target in _CONV_FUNCS:
        if axis.segmented:
            return None
        if axis.dim == 0:
            return axis
        if axis.dim >= 2 and axis.inner == 1 and axis.frames == in_shape[axis.dim]:
            return FrameAxis(axis.dim, axis.inner, out_shape[axis.dim])
        return None
    if node.op == "call_function" and node.target in _MATMUL_FUNCS and len(node.args) > 1 and node.args[1] is source:
        # A @ B keeps B's last dim (linear attention: (V K^T) Q with tokens on Q's last dim)
        last = len(in_shape) - 1
        if axis.dim == last and sympy.simplify(out_shape[-1] - in_shape[-1]) == 0 and node.args[0] is not source:
            return replace(axis, dim=len(out_shape) - 1)
        return None
    if node.op == "call_function" and node.target in _LAST_DIM_FUNCS:
        if node.args and node.args[0] is not source:
            return None
    # generic: the dim survives under right-aligned broadcasting
    dim = axis.dim + len(out_shape) - len(in_shape)
    if dim < 0 or dim >= len(out_shape) - (1 if node.op == "call_function" and node.target in _LAST_DIM_FUNCS else 0):
        return None
    if sympy.simplify(out_shape[dim] - in_shape[axis.dim]) != 0:
        return None
    return replace(axis, dim=dim)


def _cat(node: fx.Node, axis: FrameAxis, source: fx.Node, in_shape, out_shape) -> Optional[FrameAxis]:
    """cat along the frame dim puts the video tokens at an offset; along another dim the
    frame dim keeps its size and layout."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    cat_dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(cat_dim, int):
        return None
    cat_dim %= len(out_shape)
    if cat_dim != axis.dim:
        if len(out_shape) != len(in_shape) or sympy.simplify(out_shape[axis.dim] - in_shape[axis.dim]) != 0:
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
        before = before + _expr(value.shape[cat_dim])
    return replace(axis, offset=axis.offset + before, span=axis.extent(in_shape[axis.dim]))


def _slice(node: fx.Node, axis: FrameAxis, in_shape, out_shape) -> Optional[FrameAxis]:
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
            return _window(axis, start, stop - start, size, out_dim)
        if isinstance(i, slice):
            out_dim += 1
        in_dim += 1
    return None


def _window(axis: FrameAxis, start, length, size, dim: int) -> Optional[FrameAxis]:
    """The axis within elements ``[start, start + length)`` of its dim (a slice, or one piece of
    a split) now at ``dim``; None when the video segment does not lie inside them."""
    offset = sympy.simplify(axis.offset - start)
    span = axis.extent(size)
    if not _nonnegative(offset) or not _nonnegative(sympy.simplify(length - offset - span)):
        return None
    if offset == 0 and sympy.simplify(length - span) == 0:
        return FrameAxis(dim, axis.inner, axis.frames)
    return FrameAxis(dim, axis.inner, axis.frames, offset, span)


def _slice_bound(bound, size, default) -> Optional[sympy.Expr]:
    if bound is None:
        return default
    if isinstance(bound, torch.SymInt):
        bound = _expr(bound)
    elif isinstance(bound, int):
        bound = sympy.Integer(bound)
    else:
        return None
    if bound.is_number and bound < 0:
        bound = size + bound
    return sympy.Min(bound, size) if bound.is_number and size.is_number else bound


def _nonnegative(expr: sympy.Expr) -> bool:
    return bool(expr.is_nonnegative) or (expr.is_number and expr >= 0)


def follow_frame_axis(graph: fx.Graph, video: fx.Node, frame_dim: int) -> dict:
    """Layouts of every node that the frame axis of ``video`` reaches."""
    value = example_value(video)
    layouts = {video: FrameAxis(frame_dim, sympy.Integer(1), _expr(value.shape[frame_dim]))}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node in layouts:
            continue
        for arg in node.all_input_nodes:
            if arg in layouts:
                source_axis = layouts[arg]
                src_val = example_value(arg)
                if isinstance(src_val, (tuple, list)):  # chunk/split: the getitem inherits
                    continue
                if node.op == "call_function" and node.target is operator.getitem and isinstance(example_value(node), torch.Tensor) and isinstance(src_val, torch.Tensor):
                    new = _propagate(node, source_axis, arg)
                elif isinstance(example_value(node), (tuple, list)):
                    new = _split_element_axis(node, source_axis, src_val)
                else:
                    new = _propagate(node, source_axis, arg)
                if isinstance(new, list):  # split along the frame dim: one layout per element
                    layouts[node] = new
                elif new is not None and _fits(example_value(node), new):
                    layouts[node] = new
                break
        if node not in layouts and node.op == "call_function" and node.target is operator.getitem:
            parent = node.args[0]
            if isinstance(parent, fx.Node) and parent in layouts and isinstance(example_value(parent), (tuple, list)):
                inherited = layouts[parent]
                if isinstance(inherited, list):
                    k = node.args[1]
                    inherited = inherited[k] if isinstance(k, int) and -len(inherited) <= k < len(inherited) else None
                if inherited is not None:
                    layouts[node] = inherited
    return {n: a for n, a in layouts.items() if isinstance(a, FrameAxis)}


def _fits(value, axis: FrameAxis) -> bool:
    if not isinstance(value, torch.Tensor):
        return True
    return _div(axis.extent(_expr(value.shape[axis.dim])), axis.inner * axis.frames) is not None


def _split_element_axis(node: fx.Node, axis: FrameAxis, src_val) -> Optional[FrameAxis]:
    """Layout of each element of chunk/split/unbind outputs (None: split along frames)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
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


def _split_along_frames(node: fx.Node, axis: FrameAxis, src_val) -> Optional[list]:
    """chunk/split along the frame dim (text and video tokens split apart): the piece that
    holds the whole video segment keeps the axis, the others get None."""
    pieces = example_value(node)
    if not isinstance(pieces, (tuple, list)) or not all(isinstance(p, torch.Tensor) for p in pieces):
        return None
    size = _expr(src_val.shape[axis.dim])
    out, start = [], sympy.Integer(0)
    for piece in pieces:
        length = _expr(piece.shape[axis.dim])
        out.append(_window(axis, start, length, size, axis.dim))
        start = start + length
    return out if any(a is not None for a in out) else None


def find_video_inputs(graph: fx.Graph) -> list:
    """The 5-D graph inputs, largest first (a model may take several: Wan-Animate's face video)."""
    videos = [n for n in graph.nodes if n.op == "placeholder" and not is_parameter_placeholder(n)
              and isinstance(example_value(n), torch.Tensor) and example_value(n).dim() == 5]
    return sorted(videos, key=lambda n: -_numel_guess(example_value(n)))


def find_video_input(graph: fx.Graph) -> Optional[fx.Node]:
    videos = find_video_inputs(graph)
    return videos[0] if videos else None


def _numel_guess(v) -> int:
    try:
        return numel_hint(v)   # no int() on SymInts: that would specialise dynamic shapes
    except Exception:
        return 0


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
            layouts = follow_frame_axis(graph, video, dim)
            axis = layouts.get(probe)
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

"""What an FX node is, in the terms the analysis passes need (one op classification for all)."""
from __future__ import annotations

import operator
import re
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

# Residual adds: ``x = x + branch`` in any spelling Dynamo (or symbolic_trace) records.
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}

# One classification of the ops the passes reason about: (method names, functions) per kind.
# "reshape", "permute" and "cast" only re-view or re-type their first argument, so they can sit
# on a residual trunk (Latte's spatial/temporal rearranges, Wan's float()/type_as casts); the
# frame-layout rules follow the video's frame axis through each kind.
OP_KINDS = {
    "reshape": ({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
                 "contiguous"},
                {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
                 torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.contiguous, torch.Tensor.flatten,
                 torch.Tensor.unflatten, torch.Tensor.squeeze, torch.Tensor.unsqueeze}),
    "permute": ({"permute", "transpose", "movedim", "swapaxes", "swapdims", "t"},
                {torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.t,
                 torch.Tensor.permute, torch.Tensor.transpose}),
    "cast": ({"to", "float", "half", "bfloat16", "type", "type_as", "clone"},
             {torch.clone, torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as}),
    "cat": (set(), {torch.cat, torch.concat, torch.concatenate}),
    "index_copy": ({"index_copy"}, {torch.index_copy, torch.Tensor.index_copy}),
    "conv": (set(), {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}),
    "matmul": (set(), {torch.matmul, torch.bmm, operator.matmul}),
    # reductions over some dims (the rest survive, shifted left unless keepdim)
    "reduce": ({"sum", "mean", "amax", "amin", "prod", "logsumexp", "std", "var"},
               {torch.sum, torch.mean, torch.amax, torch.amin, torch.prod, torch.logsumexp, torch.std, torch.var}),
    # layer / group / RMS norms of their first argument (shape-preserving: a post-norm trunk runs through)
    "norm": (set(), {f for f in (F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm,
                                 getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None}),
    # ops that mix their first argument's last dim (tokens stay on the other dims)
    "last_dim": (set(), {torch._C._nn.linear, F.linear, F.scaled_dot_product_attention,
                         torch._C._nn.scaled_dot_product_attention}),
}
_GLUE_KINDS = ("reshape", "permute", "cast")


def op_kind(node: fx.Node) -> Optional[str]:
    """The kind of ``node`` in ``OP_KINDS`` (None: any other op)."""
    if node.op not in ("call_method", "call_function"):
        return None
    for kind, (methods, functions) in OP_KINDS.items():
        if (node.target in methods) if node.op == "call_method" else (node.target in functions):
            return kind
    return None


def is_residual_add(node: fx.Node) -> bool:
    """``a + b`` with two tensor operands."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return False
    if len(node.args) < 2 or "alpha" in node.kwargs:
        return False
    return all(isinstance(a, fx.Node) and is_tensor_node(a) for a in node.args[:2])


_NORM_MODULES = tuple(m for m in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if m is not None)


def is_norm(node: fx.Node) -> bool:
    """A layer / group / RMS norm of its first argument (a function call, or in a
    ``symbolic_trace`` graph, a call of a norm module): shape-preserving, so a post-norm
    block's trunk runs through it."""
    if node.op == "call_function":
        return op_kind(node) == "norm"
    if node.op == "call_module" and node.graph.owning_module is not None:
        try:
            return isinstance(node.graph.owning_module.get_submodule(node.target), _NORM_MODULES)
        except AttributeError:
            return False
    return False


def _global_state_targets() -> tuple:
    targets = [torch.amp._enter_autocast, torch.amp._exit_autocast, torch._C._set_grad_enabled]
    try:   # how Dynamo records torch.func.vmap (torch >= 2.6)
        from torch._functorch.predispatch import _vmap_decrement_nesting, _vmap_increment_nesting
        targets += [_vmap_increment_nesting, _vmap_decrement_nesting]
    except ImportError:  # pragma: no cover
        pass
    return tuple(targets)


# Calls that switch global state for the ops after them (autocast, grad mode, vmap nesting).
GLOBAL_STATE_TARGETS = _global_state_targets()


def is_global_state(node: fx.Node) -> bool:
    """A switch of global state for the ops after it: an autocast, grad-mode or vmap enter / exit."""
    return node.op == "call_function" and node.target in GLOBAL_STATE_TARGETS


def is_glue(node: fx.Node) -> bool:
    """A view/reshape/cast whose first argument is the only tensor that flows through."""
    return op_kind(node) in _GLUE_KINDS and bool(node.args) and isinstance(node.args[0], fx.Node)


def example_value(node: fx.Node):
    """The fake tensor (or other value) Dynamo recorded for ``node``."""
    meta = node.meta
    if "example_value" in meta:
        return meta["example_value"]
    return meta.get("val")


def is_tensor_node(node: fx.Node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def sizes_equal(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif str(x) != str(y):  # SymInts: compare their expressions
            return False
    return True


_INDEX = re.compile(r"\[(\d+)\]")
_ROOT = re.compile(r"^L\[[^\]]*\]\.?|^L__self__\.?|^self\.?")


# ``<module>.forward.__self__`` is ``<module>`` (a bound method's self); Dynamo reaches modules
# that way when a forward is wrapped (hooks: ``forward.func.__closure__.0.cell_contents.forward.__self__``).
_BOUND_SELF = re.compile(r"(^|\.)forward(\.[^.]+)*?\.__self__(?=\.|$)")


def module_path(raw: str) -> str:
    """Normalise a Dynamo ``nn_module_stack`` path: ``L['self'].blocks[3].attn`` -> ``blocks.3.attn``
    (also through a wrapped forward: ``L['self'].forward.__self__.blocks[3]`` -> ``blocks.3``)."""
    path = _ROOT.sub("", raw)
    path = _INDEX.sub(r".\1", path)
    path = path.replace("['", ".").replace("']", "")
    parts = [p for p in path.split(".") if p and p not in ("__dict__", "_modules")]
    return _BOUND_SELF.sub("", ".".join(parts)).strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, type]]:
    """The (normalised path, module class) pairs enclosing ``node``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        raw, cls = value[0], value[1]
        path = module_path(raw)
        if path:
            out.append((path, cls))
    return out


def describe_node(node: fx.Node) -> str:
    """``name = op(...)`` and the user source line that produced it (for messages)."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = ""
    trace = node.meta.get("stack_trace")
    if trace:
        # (Python 3.11+ traces underline the expression with ^~ markers: not source)
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip() and ln.strip().strip("^~ ")]
        files = [ln for ln in lines if ln.startswith("File ")]
        if files:
            where = " at " + files[-1].replace("File ", "", 1) + (f": {lines[-1]}" if not lines[-1].startswith("File ") else "")
    return f"{node.name} = {node.op} {target}{where}"


def module_calls(node: fx.Node) -> list[tuple[str, str, type]]:
    """The module calls enclosing ``node``, outermost first: (call key, normalised path, class).
    Dynamo keys each call (``"<id>"``, ``"<id>@<k>"`` for the k-th repeated call of one module)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        path = module_path(value[0])
        if path:
            out.append((str(key), path, value[1]))
    return out


def user_placeholder_name(node: fx.Node) -> str:
    """``L_timestep_`` -> ``timestep``; ``L_kwargs_timestep_`` -> ``timestep``."""
    name = str(node.target)
    for prefix in ("L_kwargs_", "L_", "l_kwargs_", "l_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.rstrip("_") if name.endswith("_") else name


def is_parameter_placeholder(node: fx.Node) -> bool:
    if node.op != "placeholder":
        return False
    v = example_value(node)
    if isinstance(v, torch.nn.Parameter):
        return True
    name = str(node.target)
    return "_parameters_" in name or "_buffers_" in name


def ancestors(node: fx.Node) -> set:
    """Every node ``node`` is computed from (not ``node`` itself)."""
    seen, stack = set(), [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def topo_index(graph: fx.Graph) -> dict:
    return {n: i for i, n in enumerate(graph.nodes)}


def size_hint(size) -> int:
    """A size (int or SymInt) by its hint, without installing a shape guard (``int()`` on a
    SymInt would specialise a dynamic shape); 0 if it has no hint (a data-dependent size)."""
    if isinstance(size, torch.SymInt):
        hint = getattr(size.node, "hint", None)
        return 0 if hint is None else int(hint)
    return int(size)


def numel_hint(value) -> int:
    """Element count of a (fake) tensor from its size hints (0 if a size has no hint)."""
    total = 1
    for size in value.shape:
        total *= size_hint(size)
    return total


def nbytes_hint(node: fx.Node) -> int:
    """Bytes of ``node``'s recorded tensor value from its size hints (0 without one)."""
    value = example_value(node)
    return numel_hint(value) * value.element_size() if isinstance(value, torch.Tensor) else 0

"""Inline the higher-order ops that only wrap a body at inference, so that the blocks inside them
are seen and cached: activation checkpoints, ``wrap`` and nested compile regions.

Research code calls its blocks through ``torch.utils.checkpoint.checkpoint(block, ...)`` (Open-Sora's
``auto_grad_checkpoint`` does when its flag is set, some code always); ``compile_model`` (and
models such as Hugging Face's) mark each repeated block a ``torch.compiler.nested_compile_region``,
so that Dynamo traces one block and stamps it out for the others. Dynamo traces such a call into
one higher-order op whose body is a subgraph: the analysis would see one opaque node per block,
and no block. At inference these ops only change what backward recomputes or how often Dynamo
traces, so the body is inlined where the op stood (same ops, same order: caching off stays
bit-identical with the eager inner compiler). The blocks are compiled once each again by
``compile/compile_blocks.py``, from the inlined graph.

Before                                                       After
    wrap_body_0 = self.wrap_body_0                               linear = torch._C._nn.linear(x, w0, b0)
    ckpt = tag_activation_checkpoint(wrap_body_0, x, w0, b0)     add = x + linear
    x_1 = ckpt[0]                                                (users of x_1 read add)

    subgraph_3 = self.subgraph_0                                 linear_3 = torch._C._nn.linear(x_3, w3, b3)
    out = invoke_subgraph(subgraph_3, 'subgraph_0', x_3, w3, b3) add_3 = x_3 + linear_3
    x_4 = out[0]                                                 (module stack: blocks.3, not blocks.0)

A nested region's body was traced at its first call (``blocks.0``), and its nodes' module stack
says so; each inlined copy gets the stack of its own call (``blocks.3``, ``blocks.3.attn``), which
is what the analysis groups blocks by.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

logger = logging.getLogger("adacache_fx")

# the higher-order ops that only wrap a body at inference: body at args[0], operands after the
# first ``skip`` arguments (invoke_subgraph's second argument is the region's identifier)
_WRAPPERS = {op: skip for op, skip in ((getattr(torch.ops.higher_order, "tag_activation_checkpoint", None), 1),
                                       (getattr(torch.ops.higher_order, "wrap", None), 1),
                                       (getattr(torch.ops.higher_order, "invoke_subgraph", None), 2))
             if op is not None}
_REGION = getattr(torch.ops.higher_order, "invoke_subgraph", None)


def is_wrapper(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _WRAPPERS


def inline_subgraphs(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every checkpoint, ``wrap`` and nested-region body inlined, nested ones included;
    ``gm`` itself (a copy of Dynamo's) is changed in place and returned."""
    inlined = 0
    first_calls: dict = {}   # a region's body attribute -> the module stack of the call that traced it
    while True:
        wrappers = [n for n in gm.graph.nodes if is_wrapper(n)]
        if not wrappers:
            break
        for node in wrappers:
            _inline(gm, node, first_calls)
            inlined += 1
    if inlined:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        logger.debug("adacache: inlined %d checkpoint / wrap / nested-region bodies", inlined)
    return gm


def _restack(stack: dict, traced_under: dict, call_stack: dict, tag: str) -> dict:
    """A body node's module stack for one call of its region: the entries of the call that traced
    the body (``traced_under``) replaced by this call's (``call_stack``), the body's own modules
    re-rooted under this call's innermost module path and keyed per call."""
    if not traced_under or list(stack)[:len(traced_under)] != list(traced_under):
        return {**call_stack, **{k: v for k, v in stack.items() if k not in call_stack}}
    old_root = list(traced_under.values())[-1][0]
    new_root = list(call_stack.values())[-1][0] if call_stack else old_root
    inner = {}
    for key, (path, *rest) in list(stack.items())[len(traced_under):]:
        if path.startswith(old_root):
            path = new_root + path[len(old_root):]
        inner[f"{key}/{tag}"] = (path, *rest)
    return {**call_stack, **inner}


def _inline(gm: fx.GraphModule, node: fx.Node, first_calls: dict) -> None:
    body_node, operands = node.args[0], node.args[_WRAPPERS[node.target]:]
    body = getattr(gm, body_node.target)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        raise RuntimeError(f"adacache: the body {body_node.target} takes {len(placeholders)} inputs, "
                           f"the call passes {len(operands)}")
    values = dict(zip(placeholders, operands))
    with gm.graph.inserting_before(node):
        for inner in body.graph.nodes:   # nested bodies and constants of the body become gm's
            if inner.op == "get_attr":
                name = f"{body_node.target}_{inner.target}".replace(".", "_")
                gm.register_module(name, getattr(body, inner.target)) if isinstance(
                    getattr(body, inner.target), torch.nn.Module) else setattr(gm, name, getattr(body, inner.target))
                values[inner] = gm.graph.get_attr(name)
                values[inner].meta = dict(inner.meta)
        copied = dict(values)
        result = gm.graph.graph_copy(body.graph, copied)
    if node.target is _REGION:
        call_stack = dict(node.meta.get("nn_module_stack") or {})
        traced_under = first_calls.setdefault(id(body), call_stack)
        for original, new in copied.items():
            if original not in values and isinstance(new, fx.Node) and "nn_module_stack" in original.meta:
                new.meta["nn_module_stack"] = _restack(original.meta["nn_module_stack"], traced_under, call_stack,
                                                       node.name)
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        else:   # the whole tuple is used: rebuild it
            with gm.graph.inserting_before(user):
                packed = gm.graph.call_function(tuple, (list(outputs),))
            user.replace_input_with(node, packed)
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == body_node.target for n in gm.graph.nodes if n is not body_node):
        if not body_node.users:
            gm.graph.erase_node(body_node)


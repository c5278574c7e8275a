"""Inline activation-checkpoint wrappers, so that the blocks inside them are seen and cached.

Research code calls its blocks through ``torch.utils.checkpoint.checkpoint(block, ...)`` (Open-Sora's
``auto_grad_checkpoint`` does when its flag is set, some code always). Dynamo traces such a call into
one higher-order op whose body is a subgraph: the analysis would see one opaque node per block,
and no block. At inference checkpointing only changes what backward recomputes, so the body is
inlined where the op stood (same ops, same order: caching off stays bit-identical with the eager
inner compiler). The op's own semantics (recompute in backward) are gone from the rewritten
graph: the cache is an inference transform.

Before                                                       After
    wrap_body_0 = self.wrap_body_0                               linear = torch._C._nn.linear(x, w0, b0)
    ckpt = tag_activation_checkpoint(wrap_body_0, x, w0, b0)     add = x + linear
    x_1 = ckpt[0]                                                (users of x_1 read add)
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

logger = logging.getLogger("adacache_fx")

# the higher-order ops that only wrap a body at inference: (target, position of the body argument)
_WRAPPERS = tuple(op for op in (getattr(torch.ops.higher_order, "tag_activation_checkpoint", None),
                                getattr(torch.ops.higher_order, "wrap", None)) if op is not None)


def is_checkpoint(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _WRAPPERS


def inline_checkpoints(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every checkpoint (and plain ``wrap``) body inlined, nested ones included;
    ``gm`` itself (a copy of Dynamo's) is changed in place and returned."""
    inlined = 0
    while True:
        wrappers = [n for n in gm.graph.nodes if is_checkpoint(n)]
        if not wrappers:
            break
        for node in wrappers:
            _inline(gm, node)
            inlined += 1
    if inlined:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        logger.debug("adacache: inlined %d checkpoint / wrap bodies", inlined)
    return gm


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    body_node, *operands = node.args
    body = getattr(gm, body_node.target)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        raise RuntimeError(f"adacache: the checkpoint body {body_node.target} takes {len(placeholders)} inputs, "
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
        result = gm.graph.graph_copy(body.graph, values)
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

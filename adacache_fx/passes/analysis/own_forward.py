"""Tell a block's own ops from the ops of wrappers around its forward.

Dynamo records every op traced while a module is being called under that module's
``nn_module_stack``, including the ops of code that wraps the module's ``forward``: a forward
pre/post hook, or a forward replaced by a wrapper that runs hooks and then the original forward
(hook registries that shard a block's input for sequence / context parallelism, offloading,
caching hooks). Such an op is no part of what the block computes: counted in, a block that
takes the full token sequence and returns a shard of it is neither a residual nor a
same-shaped stream, and the block stack is rejected.

The rule: an op belongs to a block only if its recorded stack trace passes through the block
class's own ``forward`` (the code object of ``type(block).forward``, followed through
``functools.wraps`` decorators). It is applied only where it can be judged: nodes without a
stack trace (``symbolic_trace`` graphs) stay in the block, and a block none of whose nodes'
stack traces show its forward (a forward replaced per instance) keeps all of them.
"""
from __future__ import annotations

import inspect
import re
from typing import Optional

import torch.fx as fx

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def forward_code_lines(cls) -> Optional[tuple]:
    """``(filename, function name, line numbers)`` of ``cls.forward``'s code (None: unknown)."""
    if not isinstance(cls, type):
        return None
    forward = getattr(cls, "forward", None)
    try:
        forward = inspect.unwrap(forward)
    except ValueError:
        return None
    code = getattr(forward, "__code__", None)
    if code is None:
        return None
    lines = frozenset(line for _start, _end, line in code.co_lines() if line is not None)
    return code.co_filename, code.co_name, lines


def traced_in(node: fx.Node, code_lines: tuple) -> Optional[bool]:
    """Whether ``node``'s stack trace passes through the function ``code_lines`` describes
    (None: the node has no stack trace)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    filename, name, lines = code_lines
    for file, line, function in _FRAME.findall(trace):
        if function == name and file == filename and int(line) in lines:
            return True
    return False


def wrapper_nodes(nodes: list, cls) -> list:
    """The nodes of a block of class ``cls`` traced outside its own forward (in hooks or
    wrappers around it); [] when that cannot be judged."""
    code_lines = forward_code_lines(cls)
    if code_lines is None:
        return []
    verdicts = [(node, traced_in(node, code_lines)) for node in nodes]
    if not any(v for _n, v in verdicts):
        return []   # no node shows the forward: its frames are not recognisable here
    return [node for node, v in verdicts if v is False]

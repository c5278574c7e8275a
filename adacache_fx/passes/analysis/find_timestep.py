"""Find the graph input that carries the denoising timestep.

The timestep is a per-sample input (shape ``()`` or ``(B,)``, or a Python scalar) that
feeds the sinusoidal timestep embedding (failing that, a 2-D or 3-D input that does:
per-frame or per-token timesteps): a ``sin``/``cos`` is reachable from it within
a few ops. Rotary position indices feed ``sin``/``cos`` too; a timestep embedding is told
apart by what reads the sinusoid: a learned projection (a ``linear`` on a parameter) within a
few ops, where rotary tables only multiply activations. When several inputs still qualify
(Flux also embeds its guidance scale that way), the one whose name mentions time wins, then
the first. A name given in the config (``timestep_arg``) overrides the search.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.fx as fx

from ...errors import AdaCacheConfigError
from .graph_nodes import example_value, is_parameter_placeholder, op_kind, user_placeholder_name

_SINUSOID_TARGETS = {torch.sin, torch.cos, "sin", "cos"}
_MAX_HOPS = 12
_EMBEDDING_HOPS = 6   # sin/cos -> cat (-> flip halves) (-> cast) -> linear in every timestep embedding seen
_ATTENTION = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _is_scalar_like(node: fx.Node) -> bool:
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return v.dim() <= 1
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat))


def _reachable(node: fx.Node, hit, max_hops: int) -> list:
    """The nodes within ``max_hops`` uses of ``node`` for which ``hit(n)`` holds."""
    queue, seen, found = deque([(node, 0)]), {node}, []
    while queue:
        n, depth = queue.popleft()
        if n is not node and hit(n):
            found.append(n)
            continue
        if depth >= max_hops:
            continue
        for user in n.users:
            if user not in seen:
                seen.add(user)
                queue.append((user, depth + 1))
    return found


def _is_sinusoid(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in _SINUSOID_TARGETS


def _is_learned_projection(n: fx.Node) -> bool:
    return op_kind(n) == "last_dim" and n.target not in _ATTENTION and any(
        isinstance(a, fx.Node) and is_parameter_placeholder(a) for a in n.args[1:])


def _reaches_sinusoid(node: fx.Node) -> bool:
    return bool(_reachable(node, _is_sinusoid, _MAX_HOPS))


def _feeds_embedding(node: fx.Node) -> bool:
    """A sinusoid of ``node`` is read by a learned projection within a few ops."""
    return any(_reachable(s, _is_learned_projection, _EMBEDDING_HOPS)
               for s in _reachable(node, _is_sinusoid, _MAX_HOPS))


def find_timestep(graph: fx.Graph, timestep_arg: Optional[str] = None) -> Optional[fx.Node]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and not is_parameter_placeholder(n)]
    if timestep_arg is not None:
        for node in placeholders:
            if user_placeholder_name(node) == timestep_arg:
                return node
        raise AdaCacheConfigError(
            f"adacache: timestep_arg={timestep_arg!r} names no input of the compiled graph "
            f"(inputs: {[user_placeholder_name(n) for n in placeholders]})")
    candidates = [n for n in placeholders if _is_scalar_like(n) and _reaches_sinusoid(n)]
    if not candidates:
        # Per-frame or per-token timesteps ((B, F), (B, 1, F), (B, N): diffusion forcing,
        # frame-autoregressive video models): a 2-D or 3-D input that feeds a sinusoid,
        # preferably one named like a timestep; the step clock reads it as a whole
        # (runtime/timestep_source.step_value: a pinned clean frame still advances it).
        candidates = [n for n in placeholders if _is_small_tensor(n) and _reaches_sinusoid(n)]
        if not candidates:
            return None
    candidates = [n for n in candidates if _feeds_embedding(n)] or candidates
    timed = [n for n in candidates if _is_timestep_name(n)]
    return (timed or candidates)[0]


def _is_timestep_name(node: fx.Node) -> bool:
    return is_timestep_name(user_placeholder_name(node))


def is_timestep_name(name: str) -> bool:
    """An argument named like a timestep (the graph guard's and the module guard's tie-break)."""
    return "time" in name.lower() or name in ("t", "sigma", "sigmas")


def _is_small_tensor(node: fx.Node) -> bool:
    v = example_value(node)
    return isinstance(v, torch.Tensor) and 2 <= v.dim() <= 3

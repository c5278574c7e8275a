"""Find the graph input that carries the denoising timestep.

The timestep is a per-sample input (shape ``()`` or ``(B,)``, or a Python scalar) that
feeds the sinusoidal timestep embedding (failing that, a 2-D or 3-D input that does:
per-frame or per-token timesteps): a ``sin``/``cos`` is reachable from it within
a few ops. When several inputs qualify (Flux also embeds its guidance scale that way),
the one whose name mentions time wins, then the first. A name given in the config
(``timestep_arg``) overrides the search.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.fx as fx

from ..config import AdaCacheConfigError
from .graph_nodes import example_value, is_parameter_placeholder, user_placeholder_name

_SINUSOID_TARGETS = {torch.sin, torch.cos, "sin", "cos"}
_MAX_HOPS = 12


def _is_scalar_like(node: fx.Node) -> bool:
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return v.dim() <= 1
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat))


def _reaches_sinusoid(node: fx.Node) -> bool:
    queue, seen = deque([(node, 0)]), {node}
    while queue:
        n, depth = queue.popleft()
        if n.op in ("call_function", "call_method") and n.target in _SINUSOID_TARGETS:
            return True
        if depth >= _MAX_HOPS:
            continue
        for user in n.users:
            if user not in seen:
                seen.add(user)
                queue.append((user, depth + 1))
    return False


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
        # preferably one named like a timestep; the step clock reads its first element.
        candidates = [n for n in placeholders if _is_small_tensor(n) and _reaches_sinusoid(n)]
        if not candidates:
            return None
    timed = [n for n in candidates if _is_timestep_name(n)]
    return (timed or candidates)[0]


def _is_timestep_name(node: fx.Node) -> bool:
    name = user_placeholder_name(node)
    return "time" in name.lower() or name in ("t", "sigma", "sigmas")


def _is_small_tensor(node: fx.Node) -> bool:
    v = example_value(node)
    return isinstance(v, torch.Tensor) and 2 <= v.dim() <= 3

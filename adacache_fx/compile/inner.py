"""The inner compiler: what compiles each rewritten piece."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch


def resolve_inner(inner: Union[str, Callable], mode: Optional[str] = None, options: Optional[dict] = None) -> Callable:
    """``"inductor"`` (with ``mode``/``options``), ``"eager"``, ``"aot_eager"``, any registered
    backend name, or a backend callable."""
    if callable(inner):
        if mode or options:
            raise ValueError("mode/options apply to inner='inductor' only")
        return inner
    if not isinstance(inner, str):
        raise ValueError(f"inner must be a backend name or callable, got {inner!r}")
    if inner == "inductor":
        patches = {}
        if mode is not None:
            patches.update(torch._inductor.list_mode_options(mode))
        patches.update(options or {})

        def compile_inductor(gm, example_inputs):
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs, config_patches=patches) if patches else compile_fx(gm, example_inputs)
        return compile_inductor
    if mode or options:
        raise ValueError("mode/options apply to inner='inductor' only")
    if inner == "adacache":
        raise ValueError("inner='adacache' would apply the pass twice")
    return torch._dynamo.lookup_backend(inner)

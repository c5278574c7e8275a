"""Version checks, defined once (torchao style).

The declared floor is torch 2.6, the release that made the ``torch.library`` custom-op API
this package registers its op with (``custom_op``, ``register_kernel``, ``register_fake``)
and Dynamo's ``nn_module_stack`` metadata stable in the form the analysis reads. Only
torch 2.13 is tested here; older releases are refused at import with this message.
"""
from __future__ import annotations

import functools
import importlib.util
import re

import torch

TORCH_MIN = (2, 6)


def _parse(version: str) -> tuple:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


TORCH_VERSION = _parse(torch.__version__)


def check_torch() -> None:
    if TORCH_VERSION < TORCH_MIN:
        raise ImportError(f"adacache-fx needs torch>={TORCH_MIN[0]}.{TORCH_MIN[1]}, found {torch.__version__}")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether a triton package is installed (looked up once: the metric op asks on every CUDA
    call). Whether it imports is another matter: a broken install raises its import error where
    the Triton kernel is first needed."""
    return importlib.util.find_spec("triton") is not None


"""A zoo of tiny Diffusion Transformers for tests.

Every entry is a :class:`ModelCase`:

* ``build()`` -> an eval-mode float32 ``nn.Module`` with seeded random, non-zero weights
  (the adaLN-Zero / zero-out initialisations of the originals would make every block's
  residual exactly zero and caching tests vacuous), tiny enough that one forward takes a few
  milliseconds on CPU;
* ``make_inputs(batch, t, seed=0)`` -> ``(args, kwargs)`` with seeded random latents and
  conditioning; the timestep is a float32 tensor of shape ``(batch,)`` filled with ``t``
  (a tensor ``t`` of shape ``(batch,)`` is used as it is). diffusers models get
  ``return_dict=False``: use :func:`get_output` (or ``case.output(...)``) to pull the sample
  tensor out of whatever the model returns;
* ``is_video``, ``num_blocks`` (total residual blocks over all block lists), ``notes``;
* ``block_lists``: attribute paths of the ``nn.ModuleList`` s holding the residual blocks, in
  execution order of their first block (``("blocks",)``, ``("spatial_blocks", "temporal_blocks")``);
* ``core``: True only for the five reference cases (``ref_dit``, ``ref_stdit``, ``dit``,
  ``pixart``, ``latte``) that the core test suite runs;
* ``t_max``: the timestep scale the model is used with (1000 for DDPM-style timesteps, 1 for
  flow-matching models that take sigma in [0, 1]); any float works for a forward pass;
* ``one_graph``: whether ``torch.compile(fullgraph=True)`` captures the model in one Dynamo
  graph (checked in tests/zoo/test_zoo_models.py for core cases; for the rest, read from the coverage
  matrix benchmarks/results/coverage.jsonl), ``graph_break``: the reason when it does not.

Cases: ``zoo/core.py`` (the five core cases) and ``zoo/diffusers_cases.py`` (one or more tiny
cases for every DiT-style class in ``diffusers.models.transformers``; ``NOT_DIT`` and
``NOT_COVERED`` there list the other classes with the reason). ``zoo.coverage`` runs the coverage
matrix (eager run and one-graph capture, :mod:`zoo.check`; the caching checks of
tests/zoo/test_zoo_caching.py) and renders it: ``PYTHONPATH=tests python -m zoo.coverage run|render``
from the repository root, results in benchmarks/results/coverage.{jsonl,md}.

Usage::

    from zoo import ZOO, get_case, core_cases       # tests/ importable (pytest's pythonpath, or PYTHONPATH=tests)
    case = get_case("ref_dit")
    model = case.build()
    args, kwargs = case.make_inputs(2, 500.0)
    out = case.output(model(*args, **kwargs))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = [
    "ModelCase",
    "ZOO",
    "get_case",
    "core_cases",
    "register",
    "get_output",
    "randomize_",
    "timestep_tensor",
    "load_example_models",
    "normalize_module_path",
]



@dataclasses.dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[..., tuple[tuple, dict]]
    is_video: bool
    num_blocks: int
    notes: str = ""
    core: bool = False
    block_lists: tuple[str, ...] = ()
    model_class: str = ""
    is_audio: bool = False
    one_graph: bool | None = True
    graph_break: str = ""
    t_max: float = 1000.0
    #: AdaCacheConfig fields a user of this model sets (frames_arg for packed video tokens)
    adacache: dict = dataclasses.field(default_factory=dict)
    #: False for a model whose output does not depend on its timestep argument: no graph input
    #: feeds a sinusoid, so each call is a step (AdaCacheConfig(num_steps=...))
    uses_timestep: bool = True

    @staticmethod
    def output(out: Any) -> torch.Tensor:
        return get_output(out)

    def run(self, model: nn.Module, batch: int = 1, t: float | torch.Tensor = 500.0, seed: int = 0) -> torch.Tensor:
        """Build inputs and run ``model``; returns the output sample tensor."""
        args, kwargs = self.make_inputs(batch, t, seed=seed)
        return get_output(model(*args, **kwargs))


ZOO: dict[str, ModelCase] = {}


def register(case: ModelCase) -> ModelCase:
    if case.name in ZOO:
        raise ValueError(f"duplicate zoo case {case.name!r}")
    ZOO[case.name] = case
    return case


def get_case(name: str) -> ModelCase:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo case {name!r}; known: {sorted(ZOO)}") from None


def core_cases() -> list[ModelCase]:
    return [c for c in ZOO.values() if c.core]


def get_output(out: Any) -> torch.Tensor:
    """The sample tensor of a model output: a tensor, a tuple/list (first item), or a
    diffusers ``BaseOutput`` (``.sample`` or first field)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return get_output(out[0])
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, dict):
        return get_output(next(iter(out.values())))
    if hasattr(out, "to_tuple"):
        return get_output(out.to_tuple()[0])
    raise TypeError(f"cannot find the output tensor in {type(out)}")


def timestep_tensor(batch: int, t: float | torch.Tensor) -> torch.Tensor:
    """float32 timesteps of shape (batch,): ``t`` repeated, or ``t`` itself when it is (batch,)."""
    if isinstance(t, torch.Tensor):
        t = t.to(torch.float32)
        if t.ndim == 0 or t.numel() == 1:
            return t.reshape(()).expand(batch).clone()
        assert t.shape == (batch,), f"timestep tensor must be () or ({batch},), got {tuple(t.shape)}"
        return t
    return torch.full((batch,), float(t), dtype=torch.float32)


def _norm_like(name: str) -> bool:
    parts = name.split(".")
    if parts[-1] not in ("weight", "gamma", "g", "scale"):
        return False
    parent = parts[-2].lower() if len(parts) > 1 else ""
    return any(k in parent for k in ("norm", "ln", "rms")) and "proj" not in parent and "linear" not in parent


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Re-initialise every parameter with a seeded normal (in place); returns ``model``.

    Weights with ``ndim >= 2`` get ``N(0, s^2)``, ``s = min(std, 1/sqrt(fan_in))`` so deep
    stacks keep sane activation norms; 1-D normalisation weights get ``1 + N(0, std^2)``;
    other 1-D parameters (biases, learned scalars, tables) ``N(0, std^2)``. Buffers are kept.
    Independent of the global RNG state.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for name, p in model.named_parameters():
        if p.numel() == 0:
            continue
        if p.ndim >= 2:
            fan_in = max(p[0].numel(), 1)
            s = min(std, 1.0 / math.sqrt(fan_in))
            val = torch.randn(p.shape, generator=gen, dtype=torch.float32) * s
        else:
            val = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if _norm_like(name):
                val = val + 1.0
        p.copy_(val.to(device=p.device, dtype=p.dtype))
    return model


def _finish(model: nn.Module, seed: int = 0, randomize: bool = True) -> nn.Module:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    if randomize:
        randomize_(model, seed)
    return model.eval().requires_grad_(False)


_PATH_PREFIXES = ("L['self'].", "L['self']", "self.")


def normalize_module_path(path: str) -> str:
    """A Dynamo ``nn_module_stack`` path as a plain dotted module name:
    ``L['self'].__dict__['_modules']['transformer_blocks'].0.norm1`` -> ``transformer_blocks.0.norm1``,
    ``L['self'].blocks[3].attn`` -> ``blocks.3.attn``."""
    import re

    p = path
    for pre in _PATH_PREFIXES:
        if p.startswith(pre):
            p = p[len(pre):]
            break
    p = re.sub(r"(^|\.)__dict__\['_modules'\]\['([^']+)'\]", r".\2", p)
    p = re.sub(r"(^|\.)_modules\['([^']+)'\]", r".\2", p)
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    p = re.sub(r"\['([^']+)'\]", r".\1", p)
    return p.strip(".")


def load_example_models():
    """Import ``examples/models`` (dit, stdit); returns ``(dit_module, stdit_module)``."""
    from examples.models import dit, stdit
    return dit, stdit


def _gen(seed: int, name: str) -> torch.Generator:
    # stable per-case seed (no Python hash(), which is salted per process)
    h = sum((i + 1) * ord(c) for i, c in enumerate(name)) % 100003
    return torch.Generator(device="cpu").manual_seed(int(seed) * 1000003 + h)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale


# Case definitions register themselves on import.
from . import core as _core  # noqa: E402,F401

try:  # Part 2: the wider diffusers coverage (optional; the core cases never depend on it)
    from . import diffusers_cases as _diffusers_cases  # noqa: E402,F401
except ImportError as _e:  # pragma: no cover - e.g. diffusers missing
    if "diffusers_cases" not in str(_e) and "diffusers" not in str(_e):
        raise

"""The lifecycle in the ecosystem's shape: ``enable_cache(obj)`` / ``disable_cache(obj)`` /
``summary(obj)`` for a diffusers pipeline, a diffusers transformer or any ``nn.Module``, as
cache-dit's ``enable_cache(pipe)`` and diffusers' ``transformer.enable_cache(config)`` are used.

    import adacache_fx
    adacache_fx.enable_cache(pipe, AdaCacheConfig.fast(30))   # or a transformer / any nn.Module
    video = pipe(prompt, num_inference_steps=50)               # the preset follows the 50 steps
    adacache_fx.summary(pipe)                                  # what the last generation did
    adacache_fx.disable_cache(pipe)                            # bit-identical to never enabled

A pipeline is enabled through ``integrations.diffusers.enable`` (every pipeline call one
generation, the step count and clock from its scheduler); a module through ``compile_model``
(compiled in place, the guard chosen on the first call). Both return the backend.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .compile_model import INSTALLED, compile_model, uncompile_model
from .config import AdaCacheConfig
from .integrations import diffusers
from .passes.analysis.find_module_blocks import block_containers
from .report import Report

__all__ = ["disable", "disable_cache", "enable_cache", "summary"]


def enable_cache(obj, config: Optional[AdaCacheConfig] = None, **options):
    """Cache ``obj``: a diffusers pipeline (its denoiser, as ``integrations.diffusers.enable``), or
    a module (a diffusers transformer or any ``nn.Module``, as ``compile_model``); ``options`` go
    to that entry point (``inner=``, ``block_guard=``, ``dynamic=`` ...). Returns the backend.
    Raises ``RuntimeError`` when caching is already enabled on ``obj``, ``TypeError`` on what is
    neither, ``ValueError`` on a module with no block stack to cache."""
    if _backend_of(obj) is not None:
        raise RuntimeError(f"adacache_fx.enable_cache: caching is already enabled on this {type(obj).__name__}; "
                           "call adacache_fx.disable_cache(obj) first (or backend.set_config to change the schedule)")
    if _is_pipeline(obj):
        return diffusers.enable(obj, config, **options)
    if isinstance(obj, torch.nn.Module):
        _check_has_blocks(obj)
        return compile_model(obj, config, **options)
    raise TypeError(f"adacache_fx.enable_cache takes a diffusers pipeline or an nn.Module, got {type(obj).__name__}")


def disable_cache(obj) -> None:
    """Undo :func:`enable_cache` (or ``integrations.diffusers.enable`` / ``compile_model``): every
    patched thing is restored (the model's call, its blocks' forwards, a pipeline's class and its
    scheduler's ``step``), so the output is the never-compiled model's. Raises ``ValueError`` on an
    object this library never enabled."""
    if diffusers.backend_of(obj) is not None:
        diffusers.disable(obj)
    elif INSTALLED in getattr(obj, "__dict__", {}):
        uncompile_model(obj)
    else:
        raise ValueError(f"adacache_fx.disable_cache: caching was never enabled on this {type(obj).__name__} "
                         "(enable it with adacache_fx.enable_cache(obj))")


#: the name of the first release's undo (kept)
disable = disable_cache


def summary(obj, file=None) -> Union[Report, dict]:
    """Print (to ``file``, default stdout) and return what the last generation of ``obj`` did: its
    :class:`~adacache_fx.report.Report` (computed steps, metrics, cache bytes, regions). A pipeline
    with several denoisers (Wan 2.2's two experts) gives one report per denoiser, by attribute,
    each with the steps it computed numbered by the pipeline's steps too."""
    backend = _backend_of(obj)
    if backend is None:
        raise ValueError(f"adacache_fx.summary: caching is not enabled on this {type(obj).__name__}")
    if diffusers.backend_of(obj) is None:
        report = _report(backend, obj)
        print(report, file=file)
        return report
    denoisers, first_steps = diffusers.denoisers_of(obj), diffusers.first_steps_of(obj)
    reports = {}
    for name, module in denoisers.items():
        report = reports[name] = _report(backend, module)
        if len(denoisers) > 1:
            report.model, report.first_step = name, first_steps.get(name, 1)
        print(report, file=file)
    return reports if len(reports) > 1 else next(iter(reports.values()))


def _report(backend, module) -> Report:
    try:
        return backend.report(module)
    except ValueError:   # enabled, but not run yet (or ran uncached)
        return backend.report()


def _backend_of(obj):
    backend = diffusers.backend_of(obj)
    if backend is not None:
        return backend
    record = getattr(obj, "__dict__", {}).get(INSTALLED)
    return record.backend if record is not None else None


def _is_pipeline(obj) -> bool:
    """A diffusers pipeline (``DiffusionPipeline``), or an object shaped like one: a denoiser
    attribute and a scheduler."""
    try:
        from diffusers import DiffusionPipeline
        if isinstance(obj, DiffusionPipeline):
            return True
    except ImportError:
        pass
    return (not isinstance(obj, torch.nn.Module) and hasattr(obj, "scheduler")
            and any(isinstance(getattr(obj, n, None), torch.nn.Module) for n in ("transformer", "unet")))


def _check_has_blocks(model: torch.nn.Module) -> None:
    """A module with no block stack (no module list of blocks, no module class repeated with
    submodules of its own) has nothing to cache: say what it found."""
    if block_containers(model):
        return
    counts: dict = {}
    for _name, module in model.named_modules():
        if any(True for _ in module.children()):
            counts[type(module)] = counts.get(type(module), 0) + 1
    if any(n > 1 for n in counts.values()):
        return
    found = sorted({type(m).__name__ for _n, m in model.named_children()}) or ["no submodules"]
    raise ValueError(f"adacache_fx.enable_cache: {type(model).__name__} has no block stack to cache (no module list "
                     f"of blocks, no module class repeated with submodules of its own); its children: {found}")

"""Running diffusers' context parallelism on CPU processes (gloo), for tests and benchmarks.

Not part of the library: diffusers' ``enable_parallelism`` targets GPUs, and on a CPU-only
machine two things stop it, which these shims work around in each rank's process:

* ``torch.accelerator.device_count()`` is 0 there, and diffusers divides the rank by it when it
  resolves the device: :func:`cpu_workarounds` patches the count to 1 (and installs a no-op
  ``Logger.warning_once``, which diffusers' context-parallel hook calls for inputs without a
  sequence dim to split, when transformers has not added it);
* ring attention merges partial results by their log-sum-exp, and diffusers' native attention
  refuses ``return_lse=True``: :func:`cpu_lse_attention` serves it from aten's CPU flash
  attention.
"""
from __future__ import annotations

import logging

import torch


def cpu_workarounds(threads: int = 1) -> None:
    """Call first in each rank, before ``enable_parallelism``."""
    torch.set_num_threads(threads)
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1   # diffusers: rank % device_count()
    from diffusers import WanTransformer3DModel  # noqa: F401  (may import transformers, which adds warning_once)
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = lambda self, *args, **kwargs: None


def cpu_lse_attention() -> None:
    """diffusers' native attention op with ``return_lse=True`` on CPU, in diffusers' (B, S, H, D) /
    (B, S, H) layout; calls without ``return_lse`` go to the original op."""
    import diffusers.models.attention_dispatch as dispatch
    original = dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[:2]
        return out.transpose(1, 2), lse.transpose(1, 2)

    dispatch._native_attention_forward_op = forward_op


def enable_context_parallel(module: torch.nn.Module, mode: str, degree: int) -> torch.nn.Module:
    """``module.enable_parallelism`` with Ulysses (``mode="ulysses"``) or ring attention of ``degree``."""
    from diffusers import ContextParallelConfig
    if mode not in ("ulysses", "ring"):
        raise ValueError(f"mode must be 'ulysses' or 'ring', got {mode!r}")
    module.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": degree}))
    return module

"""The reference model: a small diffusers WanTransformer3DModel trained on moving shapes.

``load_reference_model()`` reads ``examples/weights/reference_model.safetensors`` and
``examples/weights/config.json``; ``sample()`` runs diffusers' FlowMatchEulerDiscreteScheduler
with an unchanged sampling loop, calling ``model_fn`` (the transformer, or a torch.compile'd
transformer) exactly as a diffusers pipeline does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from .data import FRAMES, SIZE
from .tokenizer import PromptTokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "reference_model.safetensors"
CONFIG_FILE = WEIGHTS_DIR / "config.json"

# pixel space: 3 channels, 8 frames of 32x32, patch (1, 4, 4) -> 8 * 8 * 8 = 512 tokens
DEFAULT_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=32,
    freq_dim=64,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
VIDEO_SHAPE = (3, FRAMES, SIZE, SIZE)


def build_reference_model(transformer_config: dict | None = None, seed: int = 0):
    """A freshly initialised (transformer, tokenizer) pair."""
    cfg = dict(DEFAULT_TRANSFORMER_CONFIG, **(transformer_config or {}))
    cfg["patch_size"] = tuple(cfg["patch_size"])
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**cfg)
    tokenizer = PromptTokenizer(text_dim=cfg["text_dim"])
    return transformer, tokenizer


def state_dict_for_saving(transformer, tokenizer) -> dict[str, torch.Tensor]:
    sd = {"transformer." + k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    sd["tokenizer.prompt_embedding.weight"] = tokenizer.prompt_embedding.weight.detach().contiguous()
    return sd


def load_reference_model(device="cpu", dtype=torch.float32, weights: str | Path | None = None,
                         config: str | Path | None = None):
    """Load the shipped reference model -> ``(transformer, tokenizer)`` in eval mode."""
    from safetensors.torch import load_file

    weights = Path(weights or WEIGHTS_FILE)
    config = Path(config or (weights.parent / "config.json"))
    meta = json.loads(config.read_text())
    transformer, tokenizer = build_reference_model(meta["transformer"])
    sd = load_file(str(weights))
    t_sd = {k[len("transformer."):]: v.float() for k, v in sd.items() if k.startswith("transformer.")}
    transformer.load_state_dict(t_sd, strict=True)
    tokenizer.prompt_embedding.weight.data.copy_(sd["tokenizer.prompt_embedding.weight"].float())
    # (.to(dtype) only when asked: diffusers warns about casting its float32-sensitive modules)
    for m in (transformer, tokenizer):
        m.to(device=device)
        if dtype != torch.float32:
            m.to(dtype=dtype)
        m.eval().requires_grad_(False)
    return transformer, tokenizer


def make_scheduler(shift: float | None = None) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' FlowMatchEulerDiscreteScheduler with the shift the model card recommends
    (``sampling.shift`` in config.json, 1.0 when absent) unless ``shift`` is given."""
    if shift is None:
        shift = 1.0
        if CONFIG_FILE.exists():
            shift = float(json.loads(CONFIG_FILE.read_text()).get("sampling", {}).get("shift", 1.0))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@torch.no_grad()
def sample(transformer, prompt_embeds: torch.Tensor, num_steps: int = 30, seed: int | list[int] = 0,
           guidance_scale: float = 1.0, model_fn=None, negative_prompt_embeds: torch.Tensor | None = None,
           scheduler: FlowMatchEulerDiscreteScheduler | None = None, progress=None,
           callback=None) -> torch.Tensor:
    """Generate videos ``(B, 3, F, H, W)`` in [-1, 1] from prompt embeddings ``(B, L, D)``.

    Classifier-free guidance (``guidance_scale > 1``) runs conditional and unconditional
    branches as one batch ``[uncond, cond]`` per step, as diffusers' pipelines do. The
    unconditional embedding defaults to the empty prompt, i.e. all ``<pad>`` tokens, which
    callers get from ``tokenizer([""] * B)``. ``seed`` may be one int (for the whole batch)
    or one int per video. ``model_fn`` replaces ``transformer`` for the calls (e.g. a
    torch.compile'd transformer); ``progress`` wraps the timestep iterator (e.g. tqdm).
    """
    model_fn = transformer if model_fn is None else model_fn
    p = next(transformer.parameters())
    device, dtype = p.device, p.dtype
    b = prompt_embeds.shape[0]
    seeds = [seed + 0 * i for i in range(b)] if isinstance(seed, int) else list(seed)
    if isinstance(seed, int):
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn((b, *VIDEO_SHAPE), generator=g)
    else:
        latents = torch.stack([torch.randn(VIDEO_SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = latents.to(device=device, dtype=dtype)
    prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
    do_cfg = guidance_scale > 1.0
    if do_cfg:
        if negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (e.g. tokenizer([''] * B))")
        embeds = torch.cat([negative_prompt_embeds.to(device=device, dtype=dtype), prompt_embeds])
    else:
        embeds = prompt_embeds
    scheduler = scheduler or make_scheduler()
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    it = progress(timesteps) if progress is not None else timesteps
    for i, t in enumerate(it):
        latent_in = torch.cat([latents, latents]) if do_cfg else latents
        t_in = t.expand(latent_in.shape[0])
        noise_pred = model_fn(hidden_states=latent_in, timestep=t_in, encoder_hidden_states=embeds,
                              return_dict=False)[0]
        if do_cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if callback is not None:
            callback(i, t, latents)
    return latents.clamp(-1.0, 1.0)

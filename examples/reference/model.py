"""The reference model: a small diffusers WanTransformer3DModel trained on moving shapes.

``load_reference_model()`` reads ``examples/weights/reference_model.safetensors`` and
``examples/weights/config.json``; ``sample()`` runs diffusers' FlowMatchEulerDiscreteScheduler
with an unchanged sampling loop, calling ``model_fn`` (the transformer, or a torch.compile'd
transformer) exactly as a diffusers pipeline does.

Absolute position: the transformer takes ``in_channels = 3 + 3``: the noisy video and three
fixed coordinate channels (x, y and t ramps in [-1, 1]), concatenated on the channel axis the
way diffusers' Wan image-to-video pipeline concatenates its condition latents. Without them
the network is translation-equivariant over its token grid (stride = kernel patch embedding,
relative RoPE, per-token norms) and cannot know where the canvas edges are or which frame
comes first. ``model_input()`` adds them; ``sample()`` calls it, so callers pass and get
3-channel videos. A model with ``in_channels == out_channels`` (the earlier weights) gets
no extra channels.
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

# pixel space: 3 channels (+ 3 coordinate channels in), 8 frames of 32x32,
# patch (2, 4, 4) -> 4 * 8 * 8 = 256 tokens
COORD_CHANNELS = 3
DEFAULT_TRANSFORMER_CONFIG = dict(
    patch_size=(2, 4, 4),
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=3 + COORD_CHANNELS,
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


def coordinate_channels(frames: int = FRAMES, height: int = SIZE, width: int = SIZE,
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed ``(3, F, H, W)`` ramps in [-1, 1]: x (left -> right), y (top -> bottom), t (first -> last frame)."""
    def ramp(n):
        return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype)

    x = ramp(width).view(1, 1, width).expand(frames, height, width)
    y = ramp(height).view(1, height, 1).expand(frames, height, width)
    t = ramp(frames).view(frames, 1, 1).expand(frames, height, width)
    return torch.stack([x, y, t])


def model_input(transformer, x: torch.Tensor) -> torch.Tensor:
    """What the transformer is called with for the video ``x`` ``(B, 3, F, H, W)``:
    ``cat([x, coords], dim=1)`` when the transformer takes coordinate channels
    (``in_channels == out_channels + 3``), else ``x`` unchanged."""
    cfg = transformer.config
    extra = int(cfg.in_channels) - x.shape[1]
    if extra == 0:
        return x
    if extra != COORD_CHANNELS:
        raise ValueError(f"transformer takes {cfg.in_channels} channels, video has {x.shape[1]}")
    b, _, f, h, w = x.shape
    c = coordinate_channels(f, h, w, device=x.device, dtype=x.dtype)
    return torch.cat([x, c.unsqueeze(0).expand(b, -1, -1, -1, -1)], dim=1)


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
    # sample() takes its default scheduler shift from the config these weights came with
    transformer.reference_config_file = str(config)
    return transformer, tokenizer


def sampling_settings(config: str | Path | None = None) -> dict:
    """``sampling`` of a config.json (default: the shipped one), ``{}`` when absent."""
    config = Path(config or CONFIG_FILE)
    if not config.exists():
        return {}
    return dict(json.loads(config.read_text()).get("sampling", {}))


def make_scheduler(shift: float | None = None, config: str | Path | None = None) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' FlowMatchEulerDiscreteScheduler with the shift the model card recommends
    (``sampling.shift`` in ``config``, default the shipped config.json; 1.0 when absent)
    unless ``shift`` is given."""
    if shift is None:
        shift = float(sampling_settings(config).get("shift", 1.0))
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
    if scheduler is None:
        scheduler = make_scheduler(config=getattr(transformer, "reference_config_file", None))
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    it = progress(timesteps) if progress is not None else timesteps
    for i, t in enumerate(it):
        latent_in = torch.cat([latents, latents]) if do_cfg else latents
        latent_in = model_input(transformer, latent_in)  # + coordinate channels
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

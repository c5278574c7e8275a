"""The five core zoo cases: the two reference models in examples/models and diffusers'
DiT, PixArt and Latte transformers. Tiny configs: one forward is a few ms on CPU."""

from __future__ import annotations

import torch

from . import ModelCase, _finish, _gen, _randn, load_example_models, register, timestep_tensor

# ---------------------------------------------------------------------------------------------
# ref_dit: examples/models/dit.py (class-conditional DiT, self.blocks)
# ---------------------------------------------------------------------------------------------
REF_DIT_CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                   mlp_ratio=4.0, num_classes=10, learn_sigma=True)


def build_ref_dit() -> torch.nn.Module:
    dit, _ = load_example_models()
    model = dit.DiT(**REF_DIT_CFG, init="paper")
    dit.init_random_(model, seed=0)
    return _finish(model, randomize=False)


def inputs_ref_dit(batch: int, t, seed: int = 0):
    g = _gen(seed, "ref_dit")
    x = _randn(g, batch, 4, 8, 8)
    y = torch.randint(0, 10, (batch,), generator=g)
    return (x, timestep_tensor(batch, t), y), {}


register(ModelCase(
    name="ref_dit", build=build_ref_dit, make_inputs=inputs_ref_dit, is_video=False, num_blocks=4,
    block_lists=("blocks",), core=True, model_class="examples.models.dit.DiT",
    notes="forward(x, t, y); y are class labels in [0, 10), 10 is the null class. Output (B, 8, 8, 8) "
          "(learn_sigma: eps and variance channels).",
))

# ---------------------------------------------------------------------------------------------
# ref_stdit: examples/models/stdit.py (STDiT3-like, spatial_blocks + temporal_blocks)
# ---------------------------------------------------------------------------------------------
REF_STDIT_CFG = dict(input_size=(8, 8), in_channels=4, patch_size=(1, 2, 2), hidden_size=64, depth=2,
                     num_heads=4, mlp_ratio=4.0, caption_channels=32, pred_sigma=True)
REF_STDIT_FRAMES = 4
REF_STDIT_TEXT_LEN = 6


def build_ref_stdit() -> torch.nn.Module:
    _, stdit = load_example_models()
    model = stdit.STDiT3(**REF_STDIT_CFG, init="default")
    stdit.init_random_(model, seed=0)
    return _finish(model, randomize=False)


def inputs_ref_stdit(batch: int, t, seed: int = 0):
    g = _gen(seed, "ref_stdit")
    x = _randn(g, batch, 4, REF_STDIT_FRAMES, 8, 8)
    y = _randn(g, batch, REF_STDIT_TEXT_LEN, 32)
    return (x, timestep_tensor(batch, t), y), {}


register(ModelCase(
    name="ref_stdit", build=build_ref_stdit, make_inputs=inputs_ref_stdit, is_video=True, num_blocks=4,
    block_lists=("spatial_blocks", "temporal_blocks"), core=True, model_class="examples.models.stdit.STDiT3",
    notes="forward(x (B,4,T=4,8,8), timestep, encoder_hidden_states (B,6,32)); tokens (B, T*S, C) with "
          "S=16; 2 spatial + 2 temporal blocks interleaved (sb0, tb0, sb1, tb1); frame axis of the "
          "block residual: reshape (B, T, S, C). Output (B, 8, 4, 8, 8).",
))

# ---------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel (transformer_blocks)
# ---------------------------------------------------------------------------------------------


def build_dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=4)
    return _finish(model, seed=1)


def inputs_dit(batch: int, t, seed: int = 0):
    g = _gen(seed, "dit")
    x = _randn(g, batch, 4, 8, 8)
    labels = torch.randint(0, 10, (batch,), generator=g)
    return (x,), dict(timestep=timestep_tensor(batch, t), class_labels=labels, return_dict=False)


register(ModelCase(
    name="dit", build=build_dit, make_inputs=inputs_dit, is_video=False, num_blocks=2,
    block_lists=("transformer_blocks",), core=True, model_class="diffusers.DiTTransformer2DModel",
    notes="BasicTransformerBlock with ada_norm_zero; class_labels in [0, 10). Output tuple: (sample,).",
))

# ---------------------------------------------------------------------------------------------
# diffusers PixArtTransformer2DModel (transformer_blocks, adaln_single)
# ---------------------------------------------------------------------------------------------


def build_pixart() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=32, caption_channels=24, sample_size=8,
                                     patch_size=2, norm_num_groups=4, use_additional_conditions=False)
    return _finish(model, seed=2)


def inputs_pixart(batch: int, t, seed: int = 0):
    g = _gen(seed, "pixart")
    x = _randn(g, batch, 4, 8, 8)
    ctx = _randn(g, batch, 6, 24)
    return (x,), dict(encoder_hidden_states=ctx, timestep=timestep_tensor(batch, t), return_dict=False)


register(ModelCase(
    name="pixart", build=build_pixart, make_inputs=inputs_pixart, is_video=False, num_blocks=2,
    block_lists=("transformer_blocks",), core=True, model_class="diffusers.PixArtTransformer2DModel",
    notes="ada_norm_single (shared adaln_single timestep MLP), cross-attention to a (B, 6, 24) caption.",
))

# ---------------------------------------------------------------------------------------------
# diffusers LatteTransformer3DModel (transformer_blocks + temporal_transformer_blocks)
# ---------------------------------------------------------------------------------------------
LATTE_FRAMES = 4


def build_latte() -> torch.nn.Module:
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=32, caption_channels=24, sample_size=8,
                                    patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                    attention_bias=True, video_length=LATTE_FRAMES)
    return _finish(model, seed=3)


def inputs_latte(batch: int, t, seed: int = 0):
    g = _gen(seed, "latte")
    x = _randn(g, batch, 4, LATTE_FRAMES, 8, 8)
    ctx = _randn(g, batch, 6, 24)
    return (x,), dict(timestep=timestep_tensor(batch, t), encoder_hidden_states=ctx, return_dict=False)


register(ModelCase(
    name="latte", build=build_latte, make_inputs=inputs_latte, is_video=True, num_blocks=4,
    block_lists=("transformer_blocks", "temporal_transformer_blocks"), core=True,
    model_class="diffusers.LatteTransformer3DModel",
    notes="video (B, 4, F=4, 8, 8); spatial blocks see (B*F, S, C), temporal blocks (B*S, F, C); the "
          "two lists are interleaved (s0, t0, s1, t1). Frame count must equal video_length (temp_pos_embed).",
))

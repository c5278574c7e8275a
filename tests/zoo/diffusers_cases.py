"""Part 2 of the zoo: every transformer class in ``diffusers.models.transformers`` that denoises
images, video or audio with a stack of residual blocks, as a tiny, randomly initialised
:class:`~zoo.ModelCase` (non-core). Classes that are not DiT denoisers are listed in
:data:`NOT_DIT` with the reason. ``one_graph`` / ``graph_break`` are the capture results of
the committed coverage matrix (benchmarks/results/coverage.jsonl, written by
``PYTHONPATH=tests python -m zoo.coverage run``; torch 2.13, diffusers 0.42.1, CPU); see
benchmarks/results/coverage.md.

Configs were chosen here by reading each class's constructor and forward (no copied test
configs): 1-2 blocks per list, hidden sizes 16-64, 8x8 latents (video: 2-4 frames)."""

from __future__ import annotations

import importlib

import torch

from . import ZOO as _ZOO
from . import ModelCase, _finish, _gen, _randn, register, timestep_tensor

#: diffusers classes (in diffusers.models.transformers) that are not DiT denoisers, with the reason.
NOT_DIT: dict[str, str] = {
    "PriorTransformer": "unCLIP prior: denoises a CLIP image embedding (one vector), not image/video/audio latents",
    "DualTransformer2DModel": "wrapper holding two Transformer2DModel for UNet cross-attention mixing (Versatile "
                              "Diffusion); not a standalone denoiser",
    "TransformerTemporalModel": "temporal attention layer inside video UNets (e.g. AnimateDiff/Text2Video); input and "
                                "output are UNet feature maps, not a denoiser",
    "MiniMaxMusic3RVQDepthDecoder": "autoregressive RVQ depth decoder (code tokens, no timestep); not a diffusion "
                                    "denoiser",
    "RFD4ProteinaTransformer": "protein structure generator (atom coordinates and pair representations), not "
                               "image/video/audio",
}

#: DiT denoisers that are not zoo cases, with the reason.
NOT_COVERED: dict[str, str] = {
    "Cosmos3OmniTransformer": "unified LLM + generation-expert (und/gen) transformer that denoises vision/sound/"
                              "action tokens inside ONE unbatched packed sequence (hidden (seq, D), no batch axis; "
                              "text ids, mRoPE position ids, per-item lists of latents/shapes/noisy-frame indexes "
                              "built by the pipeline's packer); batch > 1 is not expressible as one call, so it does "
                              "not fit make_inputs(batch, t); not attempted",
    "WanAnimate2Transformer3DModel": "two-pass protocol: a reference pass (kv_cache_mode='extract') must fill a "
                                     "WanAnimate2KVCache before each generation pass (kv_cache_mode='cached', "
                                     "flex-attention block mask from origin_len/origin_area, list-of-tensor "
                                     "inputs); it cannot be driven as one model(*args) call from make_inputs",
}


def _cls(name: str):
    return getattr(importlib.import_module("diffusers"), name)


def _dcase(name: str, cls_name: str, config: dict, inputs, *, is_video: bool = False, is_audio: bool = False,
           num_blocks: int, block_lists: tuple[str, ...], notes: str = "", one_graph: bool | None = None,
           graph_break: str = "", t_max: float = 1000.0, seed: int = 0, prepare=None, adacache=None,
           uses_timestep: bool = True) -> ModelCase:
    def build():
        model = _cls(cls_name)(**config)
        model = _finish(model, seed=seed)
        if prepare is not None:
            prepare(model)
        return model

    def make_inputs(batch: int, t, seed: int = 0):
        return inputs(_gen(seed, name), batch, timestep_tensor(batch, t))

    build.__name__ = f"build_{name}"
    make_inputs.__name__ = f"inputs_{name}"
    return register(ModelCase(name=name, build=build, make_inputs=make_inputs, is_video=is_video,
                              is_audio=is_audio, num_blocks=num_blocks, notes=notes, core=False,
                              block_lists=block_lists, model_class=f"diffusers.{cls_name}",
                              one_graph=one_graph, graph_break=graph_break, t_max=t_max, adacache=adacache or {},
                              uses_timestep=uses_timestep))


def _ones(b, n):
    return torch.ones(b, n, dtype=torch.long)


# =============================================================================================
# Image models
# =============================================================================================

_dcase(
    "sd3", "SD3Transformer2DModel",
    dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
         joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
         pos_embed_max_size=16),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8),),
                     dict(encoder_hidden_states=_randn(g, b, 6, 32), pooled_projections=_randn(g, b, 16),
                          timestep=t, return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",),
    notes="MMDiT joint blocks (image + text streams); the last block is context_pre_only.",
)

_dcase(
    "sd35_dual", "SD3Transformer2DModel",
    dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
         joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
         pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8),),
                     dict(encoder_hidden_states=_randn(g, b, 6, 32), pooled_projections=_randn(g, b, 16),
                          timestep=t, return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",),
    notes="SD3.5-style: qk rms_norm and a dual-attention (MMDiT-X) first block.",
)

_dcase(
    "auraflow", "AuraFlowTransformer2DModel",
    dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
         out_channels=4, pos_embed_max_size=64),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8),),
                     dict(encoder_hidden_states=_randn(g, b, 6, 32), timestep=t, return_dict=False)),
    num_blocks=3, block_lists=("joint_transformer_blocks", "single_transformer_blocks"),
    notes="1 joint (MMDiT) block then 2 single blocks over the concatenated text+image sequence.",
)


def _flux_ids(h: int, w: int, n_txt: int):
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(n_txt, 3)


def _flux_inputs(in_ch: int, ctx_dim: int, pooled: int | None, guidance: bool = False, n_txt: int = 6):
    def f(g, b, t):
        img_ids, txt_ids = _flux_ids(4, 4, n_txt)
        kw = dict(encoder_hidden_states=_randn(g, b, n_txt, ctx_dim), timestep=t, img_ids=img_ids,
                  txt_ids=txt_ids, return_dict=False)
        if pooled:
            kw["pooled_projections"] = _randn(g, b, pooled)
        if guidance:
            kw["guidance"] = torch.full((b,), 3.5)
        return (_randn(g, b, 16, in_ch),), kw
    return f


_dcase(
    "flux", "FluxTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
         axes_dims_rope=(4, 6, 6)),
    _flux_inputs(16, 32, 16, guidance=True),
    num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"), t_max=1.0,
    notes="packed latents (B, 16 tokens = 4x4 grid of 2x2 patches, 16 ch); img_ids (N, 3), txt_ids (L, 3); "
          "timestep in [0, 1] (the model multiplies by 1000); guidance-distilled (guidance=3.5).",
)

_dcase(
    "chroma", "ChromaTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
         approximator_hidden_dim=32, approximator_layers=1),
    _flux_inputs(16, 32, None),
    num_blocks=3, block_lists=("transformer_blocks", "single_transformer_blocks"), t_max=1.0,
    notes="Flux-like with a distilled modulation approximator (no per-block adaLN linears).",
)

_dcase(
    "longcat_image", "LongCatImageTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
    _flux_inputs(16, 32, None),
    num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"), t_max=1.0,
    notes="Flux-like double + single stream blocks.",
)

_dcase(
    "ovis_image", "OvisImageTransformer2DModel",
    dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    _flux_inputs(16, 32, None),
    num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"), t_max=1.0,
    notes="Flux-like double + single stream blocks.",
)

_dcase(
    "bria", "BriaTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6]),
    _flux_inputs(16, 32, 16),
    num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"), t_max=1.0,
    notes="Flux-like double + single stream blocks.",
)

_dcase(
    "sana", "SanaTransformer2DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
         mlp_ratio=2.5, sample_size=8, patch_size=1),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8),),
                     dict(encoder_hidden_states=_randn(g, b, 6, 24), timestep=t, return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",),
    notes="Sana: linear attention + GLUMBConv mixed FFN; PixArt-style adaln_single.",
)


def _hunyuan_dit_inputs(g, b, t):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    return (_randn(g, b, 4, 8, 8), t), dict(
        encoder_hidden_states=_randn(g, b, 6, 32), text_embedding_mask=_ones(b, 6),
        encoder_hidden_states_t5=_randn(g, b, 6, 24), text_embedding_mask_t5=_ones(b, 6),
        image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]).repeat(b, 1),
        style=torch.zeros(b, dtype=torch.long), image_rotary_emb=rope, return_dict=False)


_dcase(
    "hunyuan_dit", "HunyuanDiT2DModel",
    dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
         num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32, cross_attention_dim_t5=24,
         pooled_projection_dim=16, text_len=6, text_len_t5=6, use_style_cond_and_image_meta_size=True),
    _hunyuan_dit_inputs,
    num_blocks=4, block_lists=("blocks",),
    notes="U-ViT-style long skips: the second half of the blocks concatenates the output of the mirrored "
          "first-half block (skip_linear); image_rotary_emb precomputed like the pipeline.",
)


_dcase(
    "lumina2", "Lumina2Transformer2DModel",
    dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
         num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
         cap_feat_dim=24),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8), t, _randn(g, b, 6, 24), torch.ones(b, 6, dtype=torch.bool)),
                     dict(return_dict=False)),
    num_blocks=2, block_lists=("layers",), t_max=1.0,
    notes="Lumina-Image 2.0: noise/context refiners, then `layers` over the joint sequence; timestep counts UP "
          "(t = 1 - sigma).",
)


def _lumina_next_inputs(g, b, t):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    rope = get_2d_rotary_pos_embed_lumina(16, 32, 32)
    return (_randn(g, b, 4, 8, 8), t, _randn(g, b, 6, 24), torch.ones(b, 6, dtype=torch.bool), rope), dict(
        cross_attention_kwargs={}, return_dict=False)


_dcase(
    "lumina_next", "LuminaNextDiT2DModel",
    dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
         num_kv_heads=1, multiple_of=16, learn_sigma=True, qk_norm=True, cross_attention_dim=24),
    _lumina_next_inputs,
    num_blocks=2, block_lists=("layers",), t_max=1.0,
    notes="image_rotary_emb precomputed with get_2d_rotary_pos_embed_lumina like the pipeline; timestep counts UP.",
)


_dcase(
    "cogview3plus", "CogView3PlusTransformer2DModel",
    dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
         text_embed_dim=32, time_embed_dim=16, condition_dim=2, pos_embed_max_size=8, sample_size=8),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8), _randn(g, b, 6, 32), t,
                      torch.full((b, 2), 64.0), torch.full((b, 2), 64.0), torch.zeros(b, 2)),
                     dict(return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",),
    notes="original_size / target_size / crop_coords conditioning (B, 2) each.",
)

_dcase(
    "cogview4", "CogView4Transformer2DModel",
    dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
         text_embed_dim=32, time_embed_dim=16, condition_dim=2, pos_embed_max_size=8, sample_size=8,
         rope_axes_dim=(8, 8)),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8), _randn(g, b, 6, 32), t,
                      torch.full((b, 2), 64.0), torch.full((b, 2), 64.0), torch.zeros(b, 2)),
                     dict(return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",),
)

_dcase(
    "qwenimage", "QwenImageTransformer2DModel",
    dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
         joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 16, 16),),
                     dict(encoder_hidden_states=_randn(g, b, 6, 32), encoder_hidden_states_mask=_ones(b, 6),
                          timestep=t, img_shapes=[(1, 4, 4)] * b, return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
    notes="packed latents (B, 16 tokens, 4ch*2*2); img_shapes list of (frames, h, w) per sample.",
)


def _omnigen_inputs(g, b, t):
    L = 6
    n_img = 16
    total = L + 1 + n_img
    ids = torch.randint(1, 64, (b, L), generator=g)
    mask = torch.tril(torch.ones(total, total)).bool()
    mask[L + 1:, L + 1:] = True  # image tokens attend bidirectionally
    mask = mask[None].repeat(b, 1, 1).float()
    pos = torch.arange(total)[None].repeat(b, 1)
    return (_randn(g, b, 4, 8, 8), t, ids, [], {}, mask, pos), dict(return_dict=False)


_dcase(
    "omnigen", "OmniGenTransformer2DModel",
    dict(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
         intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=64, max_position_embeddings=256,
         original_max_position_embeddings=256, pos_embed_max_size=16, time_step_dim=16,
         rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}),
    _omnigen_inputs,
    num_blocks=2, block_lists=("layers",), t_max=1.0,
    notes="LLM (Phi-3 style) over [text tokens, time token, image tokens]; input_ids, attention_mask "
          "(B, N, N) and position_ids built here like the OmniGen processor for a text-only prompt.",
)


# =============================================================================================
# Video models
# =============================================================================================


def _wan_inputs(in_ch: int = 4, text_dim: int = 32, frames: int = 2, extra=None):
    def f(g, b, t):
        kw = dict(encoder_hidden_states=_randn(g, b, 6, text_dim), return_dict=False)
        if extra:
            kw.update(extra(g, b))
        return (_randn(g, b, in_ch, frames, 8, 8), t), kw
    return f


_WAN_CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)

_dcase("wan", "WanTransformer3DModel", dict(_WAN_CFG), _wan_inputs(), is_video=True, num_blocks=2,
       block_lists=("blocks",), notes="Wan 2.1 T2V: (B, C, F, H, W) latents; self-attn over all F*S tokens, "
                                      "cross-attn to text, FFN; scale_shift_table adaLN.")

_dcase("skyreels_v2", "SkyReelsV2Transformer3DModel", dict(_WAN_CFG), _wan_inputs(), is_video=True, num_blocks=2,
       block_lists=("blocks",), notes="Wan-like; diffusion forcing off (one timestep per sample).")

_dcase("chronoedit", "ChronoEditTransformer3DModel", dict(_WAN_CFG), _wan_inputs(), is_video=True, num_blocks=2,
       block_lists=("blocks",), notes="Wan-like image-editing-as-video model.")

_dcase("wan_vace", "WanVACETransformer3DModel", dict(_WAN_CFG, vace_layers=[0], vace_in_channels=8),
       _wan_inputs(extra=lambda g, b: dict(control_hidden_states=_randn(g, b, 8, 2, 8, 8))),
       is_video=True, num_blocks=2, block_lists=("blocks",),
       notes="Wan + VACE control blocks (vace_blocks) whose hints are added after chosen main blocks.")

_CV_CFG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
               text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
               max_text_seq_length=6, temporal_compression_ratio=4)

_dcase(
    "cogvideox", "CogVideoXTransformer3DModel", dict(_CV_CFG),
    lambda g, b, t: ((_randn(g, b, 3, 4, 8, 8), _randn(g, b, 6, 32), t), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",),
    notes="CogVideoX: latents are (B, F, C, H, W) (frames before channels); 3 latent frames; text of "
          "max_text_seq_length tokens; sincos positional embedding (no RoPE in this config).",
)

_dcase(
    "allegro", "AllegroTransformer3DModel",
    dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
         num_layers=2, cross_attention_dim=16, sample_height=8, sample_width=8, sample_frames=2, caption_channels=24),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), _randn(g, b, 6, 24), t), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",),
)

_dcase(
    "hunyuan_video", "HunyuanVideoTransformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
         guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), t, _randn(g, b, 6, 32), _ones(b, 6), _randn(g, b, 16)),
                     dict(guidance=torch.full((b,), 6000.0), return_dict=False)),
    is_video=True, num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"),
    notes="double-stream then single-stream blocks; token refiner on the text; guidance-distilled.",
)

_dcase(
    "mochi", "MochiTransformer3DModel",
    dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
         in_channels=4, text_embed_dim=32, time_embed_dim=16, max_sequence_length=6),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), _randn(g, b, 6, 32), t, _ones(b, 6)), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",),
    notes="asymmetric joint attention (visual + text streams).",
)

_dcase(
    "ltx_video", "LTXVideoTransformer3DModel",
    dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
         cross_attention_dim=32, num_layers=2, caption_channels=24),
    lambda g, b, t: ((_randn(g, b, 2 * 4 * 4, 8), _randn(g, b, 6, 24), t, _ones(b, 6)),
                     dict(num_frames=2, height=4, width=4, return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",), adacache=dict(frames_arg="num_frames"),
    notes="packed tokens (B, F*H*W, C) with num_frames/height/width passed as ints.",
)

_dcase(
    "easyanimate", "EasyAnimateTransformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=8,
         sample_height=8, time_embed_dim=16, num_layers=2, mmdit_layers=2, text_embed_dim=32),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), t), dict(encoder_hidden_states=_randn(g, b, 6, 32),
                                                      return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",),
)

_dcase(
    "cosmos", "CosmosTransformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
         text_embed_dim=32, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
         concat_padding_mask=False, extra_pos_embed_type="learnable"),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), t, _randn(g, b, 6, 32)), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
    notes="Cosmos 1.0 predict2-style; concat_padding_mask=False (the padding-mask path needs torchvision).",
)

_dcase(
    "sana_video", "SanaVideoTransformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
         sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), _randn(g, b, 6, 24), t), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",),
)

# =============================================================================================
# Audio models
# =============================================================================================

def _stable_audio_inputs(g, b, t):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    rope = get_1d_rotary_pos_embed(4, 8 + 1, use_real=True, repeat_interleave_real=False)
    return (_randn(g, b, 4, 8), t), dict(encoder_hidden_states=_randn(g, b, 6, 16),
                                         global_hidden_states=_randn(g, b, 1, 16), rotary_embedding=rope,
                                         return_dict=False)


_dcase(
    "stable_audio", "StableAudioDiTModel",
    dict(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
         num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=16,
         global_states_input_dim=16, cross_attention_input_dim=16),
    _stable_audio_inputs, is_audio=True, num_blocks=2, block_lists=("transformer_blocks",),
    notes="(B, C, T) audio latents; one global token is prepended; rotary embedding precomputed like the "
          "pipeline (get_1d_rotary_pos_embed(head_dim // 2, T + 1)).",
)


# =============================================================================================
# Batch 2: more image / video / audio DiTs
# =============================================================================================


def _flux_ids_n(h: int, w: int, n_txt: int, n_axes: int):
    img = torch.zeros(h, w, n_axes)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    txt = torch.zeros(n_txt, n_axes)
    if n_axes > 3:
        txt[:, 3] = torch.arange(n_txt)
    return img.reshape(h * w, n_axes), txt


def _flux2_inputs(g, b, t):
    img_ids, txt_ids = _flux_ids_n(4, 4, 6, 4)
    return (_randn(g, b, 16, 16),), dict(encoder_hidden_states=_randn(g, b, 6, 32), timestep=t, img_ids=img_ids,
                                         txt_ids=txt_ids, guidance=torch.full((b,), 4.0), return_dict=False)


_dcase(
    "flux2", "Flux2Transformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16, mlp_ratio=2.0,
         axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True),
    _flux2_inputs, num_blocks=3, block_lists=("transformer_blocks", "single_transformer_blocks"), t_max=1.0,
    notes="Flux.2: shared modulation (computed once from temb, passed to every block); 4-axis RoPE ids.",
)


def _flux3_inputs(g, b, t):
    img_ids, txt_ids = _flux_ids_n(4, 4, 6, 4)
    return (_randn(g, b, 16, 16), _randn(g, b, 6, 32), t, img_ids, txt_ids), dict(return_dict=False)


_dcase(
    "flux3", "Flux3Transformer2DModel",
    dict(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, timestep_channels=16, mlp_ratio=2.0,
         axes_dims_rope=(4, 4, 4, 4)),
    _flux3_inputs, num_blocks=4, block_lists=("mode_blocks.image", "txt_mode_blocks", "single_transformer_blocks"),
    t_max=1.0,
    notes="Flux.3: the double-stream stage keeps separate per-stream block lists (mode_blocks['image'] for "
          "image tokens, txt_mode_blocks for text; mode_blocks['image_cond'] for conditioning images), then "
          "single-stream blocks. num_blocks counts the stream lists separately (1 + 1 + 2).",
)

_dcase(
    "transformer2d_dit", "Transformer2DModel",
    dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
         patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False,
         activation_fn="gelu-approximate", attention_bias=True, norm_num_groups=4),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8),), dict(timestep=t, class_labels=torch.randint(0, 10, (b,), generator=g),
                                                  return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",),
    notes="the legacy generic Transformer2DModel configured as a patched DiT (ada_norm_zero); the same class "
          "without patch_size is a UNet attention layer (not a denoiser).",
)

_dcase(
    "hunyuan_image", "HunyuanImageTransformer2DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), text_embed_dim=32,
         rope_axes_dim=(8, 8)),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8), t, _randn(g, b, 6, 32), _ones(b, 6)), dict(return_dict=False)),
    num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"),
    notes="HunyuanImage 2.1: double + single stream blocks; token refiner on the text.",
)

_dcase(
    "hunyuan_video15", "HunyuanVideo15Transformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=24,
         image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v"),
    lambda g, b, t: ((_randn(g, b, 4, 2, 4, 4), t, _randn(g, b, 6, 32), _ones(b, 6)),
                     dict(encoder_hidden_states_2=_randn(g, b, 4, 24), encoder_attention_mask_2=_ones(b, 4),
                          image_embeds=torch.zeros(b, 3, 16), return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",), adacache=dict(frames_arg="hidden_states"),
    notes="HunyuanVideo 1.5 (t2v: image_embeds all zero); masks over text / byT5 / image tokens; its graph breaks "
          "before the blocks (`if is_t2v:`), so the blocks' graph gets tokens: frames_arg names the 5-D input.",
)

_dcase(
    "hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
         guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
         has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), t, _randn(g, b, 6, 32), _ones(b, 6), _randn(g, b, 16),
                      _randn(g, b, 3, 16), torch.arange(7, 9)),
                     dict(guidance=torch.full((b,), 6000.0), latents_clean=_randn(g, b, 4, 1, 8, 8),
                          indices_latents_clean=torch.arange(0, 1), latents_history_2x=_randn(g, b, 4, 2, 8, 8),
                          indices_latents_history_2x=torch.arange(1, 3),
                          latents_history_4x=_randn(g, b, 4, 4, 8, 8),
                          indices_latents_history_4x=torch.arange(3, 7), return_dict=False)),
    is_video=True, num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"),
    notes="FramePack: the clean / 2x / 4x history latents (1, 2, 4 frames) are packed before the noisy "
          "tokens; frame indices 1-D.",
)

_dcase(
    "consisid", "ConsisIDTransformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
         text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
         max_text_seq_length=6, is_train_face=False),
    lambda g, b, t: ((_randn(g, b, 3, 4, 8, 8), _randn(g, b, 6, 32), t), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",),
    notes="CogVideoX-derived; identity (face) path disabled (is_train_face=False); (B, F, C, H, W) latents.",
)

_dcase(
    "kandinsky5", "Kandinsky5Transformer3DModel",
    dict(in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
         model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 2, 8, 8, 4), _randn(g, b, 6, 32), t, _randn(g, b, 16)),
                     dict(visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                          text_rope_pos=torch.arange(6), return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("visual_transformer_blocks",),
    notes="channels-last latents (B, F, H, W, C); text_transformer_blocks encode the prompt first (not "
          "denoising blocks).",
)

_dcase(
    "prx", "PRXTransformer2DModel",
    dict(in_channels=4, patch_size=2, context_in_dim=24, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
         axes_dim=[8, 8]),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8), t, _randn(g, b, 6, 24)), dict(return_dict=False)),
    num_blocks=2, block_lists=("blocks",), t_max=1.0,
)

_dcase(
    "dreamlite", "DreamLiteTransformer2DModel",
    dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=32, num_layers=2,
         cross_attention_dim=32, norm_num_groups=8),
    lambda g, b, t: ((_randn(g, b, 32, 8, 8),), dict(encoder_hidden_states=_randn(g, b, 6, 32), timestep=t,
                                                    return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",), uses_timestep=False,
    notes="UNet-style Transformer2D layer (norm_type layer_norm) that never uses its `timestep` argument.",
)

_dcase(
    "ltx2", "LTX2VideoTransformer3DModel",
    dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
         cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
         audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=24),
    lambda g, b, t: ((_randn(g, b, 2 * 4 * 4, 8), _randn(g, b, 4, 8), _randn(g, b, 6, 24), _randn(g, b, 6, 24), t),
                     dict(encoder_attention_mask=_ones(b, 6), audio_encoder_attention_mask=_ones(b, 6),
                          num_frames=2, height=4, width=4, audio_num_frames=4, return_dict=False)),
    is_video=True, is_audio=True, num_blocks=2, block_lists=("transformer_blocks",),
    adacache=dict(frames_arg="num_frames"),
    notes="LTX-2 joint audio+video: each block updates the video and the audio stream (a2v / v2a cross-attn); "
          "output is (video, audio) - get_output returns the video.",
)

_dcase(
    "wan_animate", "WanAnimateTransformer3DModel",
    dict(_WAN_CFG, in_channels=12, latent_channels=4, out_channels=4, image_dim=16, motion_encoder_size=32,
         motion_style_dim=16, motion_dim=8, motion_encoder_dim=16, face_encoder_hidden_dim=16,
         face_encoder_num_heads=2, inject_face_latents_blocks=2, num_layers=4,
         motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8, "32": 8}),
    lambda g, b, t: ((_randn(g, b, 12, 2, 8, 8), t, _randn(g, b, 6, 32)),
                     dict(encoder_hidden_states_image=_randn(g, b, 4, 16),
                          pose_hidden_states=_randn(g, b, 4, 1, 8, 8),
                          face_pixel_values=_randn(g, b, 3, 1, 32, 32), return_dict=False)),
    is_video=True, num_blocks=4, block_lists=("blocks",),
    notes="face adapters after blocks 0 and 2 of 4 (inject_face_latents_blocks=2), as in the released model (40 "
          "blocks, every 5th: the last adapter follows block 35, not the last block); the motion encoder's "
          "res-blocks feed the adapters.",
)

_dcase(
    "ace_step", "AceStepTransformer1DModel",
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
         head_dim=16, in_channels=12, audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=8,
         encoder_hidden_size=24),
    lambda g, b, t: ((_randn(g, b, 16, 4), t, t, _randn(g, b, 6, 24), _randn(g, b, 16, 8)), dict(return_dict=False)),
    is_audio=True, num_blocks=2, block_lists=("layers",), t_max=1.0,
)

_dcase(
    "stable_audio3", "StableAudio3DiTModel",
    dict(io_channels=4, patch_size=1, embed_dim=32, depth=2, num_heads=2, cond_token_dim=16, global_cond_dim=16,
         local_add_cond_dim=4, timestep_features_dim=16, ff_mult=2.0, num_memory_tokens=2),
    lambda g, b, t: ((_randn(g, b, 4, 16), t, _randn(g, b, 6, 16), _randn(g, b, 16)), dict(return_dict=False)),
    is_audio=True, num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
)

_dcase(
    "longcat_audio", "LongCatAudioDiTTransformer",
    dict(dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=24, latent_dim=4, ff_mult=2.0),
    lambda g, b, t: ((_randn(g, b, 16, 4), _randn(g, b, 6, 24), torch.ones(b, 6, dtype=torch.bool), t),
                     dict(return_dict=False)),
    is_audio=True, num_blocks=2, block_lists=("blocks",), t_max=1.0,
)

_dcase(
    "minimax_music3", "MiniMaxMusic3Transformer1DModel",
    dict(in_channels=8, condition_dim=24, num_layers=2, num_attention_heads=2, attention_head_dim=16,
         ff_inner_dim=64, rotary_dim=8, fourier_embedding_dim=16),
    lambda g, b, t: ((_randn(g, b, 8, 16), t, _randn(g, b, 16, 24)), dict(return_dict=False)),
    is_audio=True, num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
)

# =============================================================================================
# Batch 3: newer families
# =============================================================================================

_dcase(
    "ernie_image", "ErnieImageTransformer2DModel",
    dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4, out_channels=4,
         patch_size=1, text_in_dim=24, rope_axes_dim=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8), t, _randn(g, b, 6, 24), torch.full((b,), 6)), dict(return_dict=False)),
    num_blocks=2, block_lists=("layers",), t_max=1.0,
    notes="text_bth (B, T, D) with text_lens (B,); image and text tokens in one sequence.",
)


def _ideogram4_inputs(g, b, t):
    n_txt, n_img = 6, 16
    L = n_txt + n_img
    pos = torch.zeros(b, L, 3, dtype=torch.long)
    pos[:, :n_txt] = torch.arange(n_txt)[None, :, None]
    hh, ww = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    pos[:, n_txt:, 0] = n_txt
    pos[:, n_txt:, 1] = hh.reshape(-1)
    pos[:, n_txt:, 2] = ww.reshape(-1)
    indicator = torch.cat([torch.full((b, n_txt), 3), torch.full((b, n_img), 2)], dim=1)
    return (_randn(g, b, L, 16), t, _randn(g, b, L, 24), pos, torch.zeros(b, L, dtype=torch.long), indicator), dict(
        return_dict=False)


_dcase(
    "ideogram4", "Ideogram4Transformer2DModel",
    dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=64,
         adaln_dim=16, llm_features_dim=24, mrope_section=(2, 1, 1)),
    _ideogram4_inputs, num_blocks=2, block_lists=("layers",), t_max=1.0,
    notes="one packed sequence of LLM-feature tokens (indicator 3) and image tokens (indicator 2); MRoPE "
          "position_ids (B, L, 3), segment_ids for block-diagonal attention.",
)


def _krea2_inputs(g, b, t):
    pos = torch.zeros(6 + 16, 3)
    hh, ww = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    pos[6:, 1] = hh.reshape(-1)
    pos[6:, 2] = ww.reshape(-1)
    return (_randn(g, b, 16, 16), _randn(g, b, 6, 2, 24), t, pos), dict(return_dict=False)


_dcase(
    "krea2", "Krea2Transformer2DModel",
    dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
         intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=24, num_text_layers=2,
         text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
         num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6)),
    _krea2_inputs, num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
    notes="text features (B, L, num_text_layers, D) fused by a small text transformer first; packed image tokens.",
)


def _glm_image_inputs(g, b, t):
    return (_randn(g, b, 4, 8, 8), _randn(g, b, 6, 24), torch.randint(0, 32, (b, 16), generator=g),
            torch.zeros(b, dtype=torch.bool), t, torch.full((b, 2), 64.0), torch.zeros(b, 2)), dict(return_dict=False)


_dcase(
    "glm_image", "GlmImageTransformer2DModel",
    dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
         text_embed_dim=24, time_embed_dim=16, condition_dim=2, prior_vq_quantizer_codebook_size=32),
    _glm_image_inputs, num_blocks=2, block_lists=("transformer_blocks",),
    notes="prior_token_id (B, N image tokens) from the AR prior; prior_token_drop (B,) bool.",
)


def _bria_fibo_inputs(g, b, t):
    img_ids, txt_ids = _flux_ids(4, 4, 6)
    return (_randn(g, b, 16, 16),), dict(encoder_hidden_states=_randn(g, b, 6, 32),
                                         text_encoder_layers=[_randn(g, b, 6, 24) for _ in range(3)],
                                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


_dcase(
    "bria_fibo", "BriaFiboTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6], text_encoder_dim=24),
    _bria_fibo_inputs, num_blocks=3, block_lists=("transformer_blocks", "single_transformer_blocks"), t_max=1.0,
    notes="Flux-like; every block gets a different text-encoder layer (text_encoder_layers list).",
)

_dcase(
    "joyimage_edit", "JoyImageEditTransformer3DModel",
    dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=24,
         mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6]),
    lambda g, b, t: ((_randn(g, b, 4, 1, 8, 8), t, _randn(g, b, 6, 24)), dict(return_dict=False)),
    num_blocks=2, block_lists=("double_blocks",),
    notes="image as a 1-frame video (B, C, 1, H, W); double-stream blocks.",
)

_dcase(
    "joyimage_edit_plus", "JoyImageEditPlusTransformer3DModel",
    dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=24,
         mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6]),
    lambda g, b, t: ((_randn(g, b, 16, 4, 1, 2, 2), t, _randn(g, b, 6, 24)),
                     dict(shape_list=[[(1, 4, 4)]] * b, return_dict=False)),
    num_blocks=2, block_lists=("double_blocks",),
    notes="pre-patchified input (B, N patches, C, pt, ph, pw) with shape_list[i] = [(t, h, w), ...] per item "
          "(edit image(s) + target).",
)

_dcase(
    "helios", "HeliosTransformer3DModel",
    dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
         text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), t, _randn(g, b, 6, 32)), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("blocks",),
    notes="Wan-derived autoregressive video model; no history latents here.",
)

_dcase(
    "anyflow", "AnyFlowTransformer3DModel",
    dict(_WAN_CFG),
    lambda g, b, t: ((_randn(g, b, 2, 4, 8, 8), t[:, None].expand(b, 2), t[:, None].expand(b, 2) * 0.5,
                      _randn(g, b, 6, 32)), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("blocks",),
    notes="Wan-derived flow-map model: latents (B, F, C, H, W); per-frame timestep and r_timestep (B, F).",
)

_dcase(
    "kandinsky6_sr", "Kandinsky6SRTransformer3DModel",
    dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=32, ff_dim=64,
         num_visual_blocks=2, axes_dims=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 2, 8, 8, 9), t), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("visual_transformer_blocks",),
    notes="super-resolution DiT (no text); channels-last input = noisy (4) + low-res condition (4) + mask (1).",
)

_dcase(
    "kandinsky6", "Kandinsky6Transformer3DModel",
    dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16, patch_size=(1, 2, 2),
         model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
         in_audio_dim=4, out_audio_dim=4),
    lambda g, b, t: ((_randn(g, b, 2, 8, 8, 4), _randn(g, b, 6, 32), _randn(g, b, 16), t),
                     dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("visual_transformer_blocks",),
)

_dcase(
    "motif_video", "MotifVideoTransformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_single_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
         rope_axes_dim=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), t, _randn(g, b, 6, 32)),
                     dict(encoder_attention_mask=_ones(b, 6), return_dict=False)),
    is_video=True, num_blocks=4, block_lists=("transformer_blocks", "single_transformer_blocks"),
)

_dcase(
    "nucleus_moe_image", "NucleusMoEImageTransformer2DModel",
    dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
         joint_attention_dim=32, axes_dims_rope=(4, 6, 6), mlp_ratio=2.0, moe_enabled=True,
         dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=16,
         capacity_factors=2.0),
    lambda g, b, t: ((_randn(g, b, 16, 16), [(1, 4, 4)] * b),
                     dict(encoder_hidden_states=_randn(g, b, 6, 32), encoder_hidden_states_mask=_ones(b, 6),
                          timestep=t, return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
    notes="Qwen-Image-like MMDiT with mixture-of-experts FFNs (token routing).",
)

_dcase(
    "qwenimage21", "QwenImage21Transformer2DModel",
    dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
         context_in_dim=32, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
    lambda g, b, t: ((_randn(g, b, 16, 16), _randn(g, b, 6, 32), t, [[(1, 4, 4)]] * b,
                      torch.cat([torch.zeros(b, 6, dtype=torch.bool), torch.ones(b, 4, dtype=torch.bool)], 1)),
                     dict(encoder_hidden_states_mask=_ones(b, 6), return_dict=False)),
    num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
    notes="VLM-conditioned: img_mask (B, text + slots) marks the image slots (4 target tokens per slot) inside "
          "the joint sequence; img_shapes nested per sample.",
)


def _zimage_inputs(g, b, t):
    return ([_randn(g, 4, 1, 8, 8) for _ in range(b)], t, [_randn(g, 6, 24) for _ in range(b)]), dict(
        return_dict=False)


_dcase(
    "z_image", "ZImageTransformer2DModel",
    dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
         n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]),
    _zimage_inputs, num_blocks=2, block_lists=("layers",), t_max=1.0,
    notes="inputs are LISTS of per-sample tensors x[i] (C, F, H, W) and cap_feats[i] (L, D); noise_refiner and "
          "context_refiner precede the main `layers`; timestep counts UP (t = 1 - sigma). Output is a list "
          "(get_output returns the first sample).",
)


def _hidream_inputs(g, b, t):
    return (_randn(g, b, 4, 8, 8), t), dict(
        encoder_hidden_states_t5=_randn(g, b, 6, 24),
        encoder_hidden_states_llama3=_randn(g, 3, b, 6, 32),
        pooled_embeds=_randn(g, b, 16), return_dict=False)


_dcase(
    "hidream_image", "HiDreamImageTransformer2DModel",
    dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, caption_channels=[24, 32], text_emb_dim=16, num_routed_experts=2,
         num_activated_experts=1, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16), llama_layers=[0, 1, 2]),
    _hidream_inputs, num_blocks=3, block_lists=("double_stream_blocks", "single_stream_blocks"),
    notes="double + single stream blocks with MoE FFNs; each block gets a different Llama-3 layer's states "
          "(encoder_hidden_states_llama3 is (num_llama_layers, B, L, D)).",
)

_dcase(
    "bria_fibo2", "BriaFibo2Transformer2DModel",
    dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
         injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
         gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(32, 16, 16)),
    lambda g, b, t: ((_randn(g, b, 4, 8, 8), t, _randn(g, b, 2, 6, 24)), dict(return_dict=False)),
    num_blocks=2, block_lists=("layers",), t_max=1.0,
    notes="encoder_hidden_states (B, 1 + len(injection_layer_ids), L, D): layer 0 feeds a perceiver that makes "
          "'gist' tokens, the others are injected as cross-attention at injection_layer_ids; noise_refiner first.",
)

_SANA_WM_REFINER_CFG = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                            attention_head_dim=16, cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8,
                            audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
                            num_layers=2, caption_channels=24)
_ROPE_CACHE: dict = {}


def _sana_wm_refiner_inputs(g, b, t):
    key = ("sana_wm_refiner", b)
    if key not in _ROPE_CACHE:
        m = _cls("SanaWMLTX2RefinerTransformer3DModel")(**_SANA_WM_REFINER_CFG)
        _ROPE_CACHE[key] = m.build_rotary_emb_for_absolute_positions(
            batch_size=b, frame_positions=[0, 1], height=4, width=4, device=torch.device("cpu"), fps=24.0)
    n = 2 * 4 * 4
    return (_randn(g, b, n, 8), _randn(g, b, 6, 24), t[:, None].expand(b, n).contiguous(), _ROPE_CACHE[key]), dict(
        encoder_attention_mask=_ones(b, 6), return_dict=False)


_dcase(
    "sana_wm_refiner", "SanaWMLTX2RefinerTransformer3DModel", dict(_SANA_WM_REFINER_CFG), _sana_wm_refiner_inputs,
    is_video=True, num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0, adacache=dict(packed_frames=2),
    notes="LTX-2-derived video refiner: packed tokens (B, F*H*W, C), per-token timestep (B, N), video_rotary_emb "
          "built by model.build_rotary_emb_for_absolute_positions (cached here); no KV cache; the frame count is "
          "no argument (it is implicit in the rotary table): packed_frames gives it.",
)


def _minimax_h3_inputs(g, b, t):
    """Two latent frames of 4 x 4 patches (frame-major video rows), 6 text and 4 audio tokens; the
    video rows sit between the text and the audio tokens, every other position, interleaved with
    the audio rows as a packed sequence may hold them (their positions come from video_indices)."""
    n_txt, n_vid, n_aud = 6, 32, 4
    L = n_txt + n_vid + n_aud
    text_idx = torch.arange(0, n_txt)
    rest = torch.arange(n_txt, L)
    audio_idx = rest[1:2 * n_aud:2]                                  # 7, 9, 11, 13
    video_idx = rest[~torch.isin(rest, audio_idx)]                  # the others, in order
    tags = torch.ones(L).long()
    tags[video_idx], tags[audio_idx] = 0, 2
    pos = torch.zeros(L, 3, dtype=torch.long)
    pos[:n_txt, 0] = torch.arange(n_txt)
    ff, hh, ww = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    pos[video_idx, 0] = ff.reshape(-1)
    pos[video_idx, 1] = hh.reshape(-1)
    pos[video_idx, 2] = ww.reshape(-1)
    pos[audio_idx, 0] = torch.arange(n_aud)
    return (_randn(g, b, n_vid, 16), _randn(g, b, n_aud, 8), _randn(g, b, n_txt, 24), t[:1],
            torch.zeros(L, dtype=torch.long), tags, pos, video_idx, audio_idx, text_idx), dict(return_dict=False)


_dcase(
    "minimax_h3", "MiniMaxH3Transformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=24, hidden_size=48, num_layers=2, num_refiner_layers=1,
         ffn_dim=64, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=24, freq_dim=16,
         time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=4),
    _minimax_h3_inputs, is_video=True, is_audio=True, num_blocks=2, block_lists=("transformer_blocks",), t_max=1.0,
    adacache=dict(packed_frames=2),
    notes="joint audio+video+text packed sequence, the video rows scattered into it at video_indices (2 latent "
          "frames; packed_frames gives the count); `timestep` holds the DISTINCT timestep values (shared by the "
          "batch; make_inputs uses t[:1]) and timestep_indices/token_tags select the adaLN row per token; "
          "output (video, audio) - get_output returns the video rows.",
)

_dcase(
    "sana_wm", "SanaWMTransformer3DModel",
    dict(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1), softmax_every_n=2,
         linear_head_dim=16, use_chunk_plucker_post_attn=False, chunk_plucker_channels=8,
         chunk_plucker_post_attn_blocks=0, image_size=8, caption_channels=24, mlp_ratio=2.0, fp32_attention=True,
         mixed_precision="fp32"),
    lambda g, b, t: ((_randn(g, b, 4, 2, 8, 8), t[:, None, None].expand(b, 1, 2).contiguous(), _randn(g, b, 6, 24)),
                     dict(encoder_attention_mask=_ones(b, 6), return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("blocks",),
    notes="per-frame timestep (B, 1, F). SANA world model without camera conditioning: linear-attention blocks with a softmax block every "
          "softmax_every_n; camera / Plucker inputs left out.",
)

_dcase(
    "anyflow_far", "AnyFlowFARTransformer3DModel",
    dict(_WAN_CFG, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, chunk_partition=(1, 1)),
    lambda g, b, t: ((_randn(g, b, 2, 4, 8, 8), t[:, None].expand(b, 2), t[:, None].expand(b, 2) * 0.5,
                      _randn(g, b, 6, 32), [1, 1]), dict(return_dict=False)),
    is_video=True, num_blocks=2, block_lists=("blocks",),
    notes="frame-autoregressive AnyFlow: chunk_partition [1, 1] (two 1-frame chunks), no KV cache, default mask.",
)

# ---------------------------------------------------------------------------------------------
# one_graph / graph_break from the capture results of the coverage matrix
# (benchmarks/results/coverage.jsonl, `PYTHONPATH=tests python -m zoo.coverage run`)
# ---------------------------------------------------------------------------------------------


def _apply_graph_status() -> None:
    from .results import capture_status

    status = capture_status()
    for name, case in _ZOO.items():
        st = status.get(name)
        if st is None or case.core:
            continue
        case.one_graph = st.get("one_graph")
        case.graph_break = st.get("graph_break") or ""


def covered_classes() -> dict[str, list[str]]:
    """diffusers class name -> zoo case names."""
    out: dict[str, list[str]] = {}
    for name, case in _ZOO.items():
        if case.model_class.startswith("diffusers."):
            out.setdefault(case.model_class.split(".", 1)[1], []).append(name)
    return out


def transformer_classes() -> list[str]:
    """Every ModelMixin class defined in diffusers.models.transformers (the coverage universe)."""
    import inspect
    import pkgutil

    import diffusers.models.transformers as T
    from diffusers.models.modeling_utils import ModelMixin

    names = set()
    for m in pkgutil.iter_modules(T.__path__):
        try:
            mod = importlib.import_module(f"{T.__name__}.{m.name}")
        except Exception:  # noqa: BLE001 - optional deps of exotic models
            continue
        for n, c in vars(mod).items():
            if inspect.isclass(c) and issubclass(c, ModelMixin) and c.__module__ == mod.__name__:
                names.add(n)
    return sorted(names)


_dcase(
    "t5_film", "T5FilmDecoder",
    dict(input_dims=8, targets_length=16, d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64),
    lambda g, b, t: (([(_randn(g, b, 6, 32), torch.ones(b, 6))], _randn(g, b, 16, 8), t), {}),
    is_audio=True, num_blocks=2, block_lists=("decoders",), t_max=1.0,
    notes="not a DiT proper: the T5-style FiLM decoder of spectrogram diffusion (MIDI -> spectrogram); kept "
          "because it denoises audio frames with a timestep-conditioned residual stack. encodings_and_masks is a "
          "list of (encoding (B, L, d_model), mask (B, L)); noise time in [0, 1).",
)


_apply_graph_status()  # keep last: applies to every case registered above

"""Tiny diffusers pipelines built from randomly initialised components (no download), and one
call of each: the class-conditional DiTPipeline (classifier-free guidance batched in one call) and
WanPipeline (prompt embeddings given, no text encoder; two transformer calls per step). Used by
tests/integrations/test_integrations_diffusers.py and tests/distributed/test_diffusers_context_parallel.py."""
import pytest
import torch

import diffusers
from zoo import randomize_


def tiny_dit_pipeline(scheduler=None):
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4)
    randomize_(transformer, seed=0)   # adaLN-Zero init would make every block residual zero
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                  latent_channels=4, norm_num_groups=4, sample_size=8)
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(),
                                 scheduler=scheduler or diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps, labels=(1, 2), seed=0, guidance_scale=4.0):
    return pipe(class_labels=list(labels), num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def _tiny_wan_transformer(seed):
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    randomize_(transformer, seed=seed)
    return transformer.eval()


def tiny_wan_pipeline(experts=1, boundary_ratio=None):
    """A tiny WanPipeline; ``experts=2``: Wan 2.2 A14B's layout, a high-noise ``transformer`` and
    a low-noise ``transformer_2`` (other weights) switched at ``boundary_ratio``."""
    pytest.importorskip("transformers")   # diffusers builds WanPipeline only with transformers present
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    # no tokenizer / text encoder: the prompts come as embeddings (nothing to download)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=_tiny_wan_transformer(0),
                                 transformer_2=_tiny_wan_transformer(1) if experts == 2 else None, vae=vae.eval(),
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    return pipe, embeds


def run_wan(pipe, embeds, steps, seed=0, num_frames=9, size=64):
    return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=size, width=size,
                num_frames=num_frames, num_inference_steps=steps, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt").frames

"""Open-Sora 1.2's STDiT3 as the AdaCache paper's code runs it, written here from its description
(no upstream code): what ``examples/models/stdit.py`` leaves out.

* Per-frame masks (``x_mask`` (B, T) bool: frames given as conditioning are denoised at t = 0):
  every block computes its modulation from the timestep and from t = 0 and selects per frame
  with ``torch.where``, for the attention input, the gated attention residual and the gated MLP
  residual: ``x = x + where(mask, gate * f(x), gate0 * f(x))``.
* Variable-length text: the padded caption states are packed with ``masked_select`` and their
  lengths read with ``.tolist()``; cross-attention is block-diagonal over the packed tokens.
* The position embedding is scaled by the resolution read with ``.item()``.

Under plain ``torch.compile`` those reads break the graph outside the blocks.

``HandwrittenAdaCache`` is the paper's way of caching, patched into the model by hand: while it is
set, a skipped step adds the stack's cached delta and runs no block, a computed step runs the
blocks, keeps the delta and the probe (the attention residual of one temporal block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from examples.models.stdit import STDiT3, STDiT3Block, t2i_modulate


def t_mask_select(x_mask: torch.Tensor, x: torch.Tensor, masked_x: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Per frame: ``x`` where ``x_mask`` (B, T) holds, ``masked_x`` elsewhere; (B, T*S, C)."""
    B, _, C = x.shape
    x, masked_x = x.reshape(B, T, S, C), masked_x.reshape(B, T, S, C)
    return torch.where(x_mask[:, :, None, None], x, masked_x).reshape(B, T * S, C)


class MaskedBlock(STDiT3Block):
    record = False   # keep the attention residual (the hand-written cache reads it)

    def forward(self, x, y, kv_mask, t0, t0_zero, x_mask, T: int, S: int):
        B, N, C = x.shape
        mods = (self.scale_shift_table[None] + t0.reshape(B, 6, C)).chunk(6, dim=1)
        zero = (self.scale_shift_table[None] + t0_zero.reshape(B, 6, C)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        shift_msa0, scale_msa0, gate_msa0, shift_mlp0, scale_mlp0, gate_mlp0 = zero
        h = self.norm1(x)
        x_m = t_mask_select(x_mask, t2i_modulate(h, shift_msa, scale_msa), t2i_modulate(h, shift_msa0, scale_msa0), T, S)
        if self.temporal:
            a = x_m.reshape(B, T, S, C).permute(0, 2, 1, 3).reshape(B * S, T, C)
            a = self.attn(a).reshape(B, S, T, C).permute(0, 2, 1, 3).reshape(B, T * S, C)
        else:
            a = self.attn(x_m.reshape(B * T, S, C)).reshape(B, T * S, C)
        residual = t_mask_select(x_mask, gate_msa * a, gate_msa0 * a, T, S)
        if self.record:
            self.attn_residual = residual
        x = x + residual
        x = x + self._cross(x, y, kv_mask)
        h = self.norm2(x)
        x_m = t_mask_select(x_mask, t2i_modulate(h, shift_mlp, scale_mlp), t2i_modulate(h, shift_mlp0, scale_mlp0), T, S)
        m = self.mlp(x_m)
        return x + t_mask_select(x_mask, gate_mlp * m, gate_mlp0 * m, T, S)

    def _cross(self, x, y, kv_mask):
        """Cross-attention to the packed text tokens ``y`` (1, sum(lengths), C), each sample to its own."""
        ca = self.cross_attn
        B, N, C = x.shape
        q = ca.q_linear(x).reshape(B, N, ca.num_heads, ca.head_dim).transpose(1, 2)
        k, v = ca.kv_linear(y).reshape(1, -1, 2, ca.num_heads, ca.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # written out (the released code calls xformers' block-diagonal attention here)
        scores = (q @ k.transpose(-1, -2)) / ca.head_dim ** 0.5
        weights = scores.masked_fill(~kv_mask[:, None, None, :], float("-inf")).softmax(dim=-1)
        return ca.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


@dataclass
class HandwrittenAdaCache:
    """The state the paper's hand-patched model keeps: skip this call, the stack's delta, the probe."""

    probe_block: int
    skip: bool = False
    delta: Optional[torch.Tensor] = None
    probe: Optional[torch.Tensor] = None


class OpenSoraStyleSTDiT3(STDiT3):
    handwritten: Optional[HandwrittenAdaCache] = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for blocks in (self.spatial_blocks, self.temporal_blocks):
            for i, block in enumerate(blocks):
                masked = MaskedBlock(self.hidden_size, self.num_heads, temporal=block.temporal)
                masked.load_state_dict(block.state_dict())
                blocks[i] = masked

    def forward(self, x, timestep, y, mask, x_mask, height, width):
        B = x.shape[0]
        pt, ph, pw = self.patch_size
        T, Hp, Wp = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        S = Hp * Wp
        scale = (height[0].item() * width[0].item()) ** 0.5 / (Hp * ph * Wp * pw) ** 0.5   # 1 at the base size
        x = self.x_embedder(x).flatten(3).permute(0, 2, 3, 1)
        x = (x + self.pos_embed * scale).reshape(B, T * S, self.hidden_size)
        t = self.t_embedder(timestep)
        t0, t0_zero = self.t_block(t), self.t_block(self.t_embedder(torch.zeros_like(timestep)))
        y = self.y_embedder(y)
        y = y.masked_select(mask[:, :, None] != 0).view(1, -1, self.hidden_size)   # the valid tokens, packed
        lengths = mask.sum(dim=1).tolist()
        owner = torch.repeat_interleave(torch.arange(B, device=x.device), torch.tensor(lengths, device=x.device))
        kv_mask = owner[None, :] == torch.arange(B, device=x.device)[:, None]      # block-diagonal (B, sum)
        hw = self.handwritten
        if hw is not None and hw.skip:
            x = x + hw.delta
        else:
            x_in = x
            for sb, tb in zip(self.spatial_blocks, self.temporal_blocks):
                x = sb(x, y, kv_mask, t0, t0_zero, x_mask, T, S)
                x = tb(x, y, kv_mask, t0, t0_zero, x_mask, T, S)
            if hw is not None:
                hw.delta, hw.probe = x - x_in, self.temporal_blocks[hw.probe_block].attn_residual
        return self.unpatchify(self.final_layer(x, t), T, Hp, Wp)


def make_inputs(batch: int = 2, frames: int = 4, size: int = 8, text: int = 6, seed: int = 0) -> tuple:
    """Latents, caption states with per-sample lengths, the text mask, a frame mask with the
    first frame as conditioning, and the resolution."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, size, size, generator=g)
    y = torch.randn(batch, text, 24, generator=g)
    mask = torch.zeros(batch, text, dtype=torch.long)
    for b in range(batch):
        mask[b, : text - b] = 1
    x_mask = torch.ones(batch, frames, dtype=torch.bool)
    x_mask[:, 0] = False
    height, width = torch.full((batch,), size), torch.full((batch,), size)
    return x, y, mask, x_mask, height, width

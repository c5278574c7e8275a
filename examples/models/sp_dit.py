"""A sequence-parallel video DiT (Ulysses-style all-to-all attention) for torch.distributed.

Written here from the DeepSpeed-Ulysses description, as the multi-GPU example of the
AdaCache backend (issue 6). Every rank holds the whole model and the whole input; the
token sequence is sharded across the ranks of the sequence-parallel (SP) group:

* input latents ``(B, C, T, H, W)``; a Conv3d patch embedding gives ``(B, T, S, D)``
  tokens (S = spatial tokens per frame) plus a fixed 2D sin-cos position embedding;
* **sharding**: rank ``r`` keeps the spatial tokens ``[r*S/P, (r+1)*S/P)`` *of every
  frame*, i.e. ``(B, T, S/P, D)``, laid out frame-major as ``(B, T*S/P, D)``. Splitting
  inside frames (not across frames) keeps every frame pair ``(f, f+1)`` of a spatial
  position on one rank, so MoReg's frame-difference sums, taken per shard and summed
  over ranks, equal the single-process sums exactly (up to float rounding): the motion
  score needs no halo exchange;
* ``self.blocks``: an ``nn.ModuleList`` of :class:`SPBlock` (adaLN-modulated full
  spatio-temporal self-attention, cross-attention to text tokens, MLP, PixArt-style
  ``scale_shift_table``). Self-attention is Ulysses: one all-to-all turns the local
  ``(B, N/P, H, hd)`` q/k/v into ``(B, N, H/P, hd)`` (all tokens, a slice of the heads),
  attention runs over the full sequence, a second all-to-all brings the output back to
  ``(B, N/P, H, hd)``. Cross-attention and MLP are local;
* final layer on the local tokens, then one all-gather of the outputs so that every
  rank returns the full ``(B, C_out, T, H, W)``.

The collectives are ``torch.distributed._functional_collectives`` (``all_to_all_single``,
``all_gather_tensor``), so ``torch.compile`` traces them into the graph: the AdaCache
backend sees them, takes their group as the default process group of the metric's
all-reduce, and removes the all-to-alls of skipped blocks from the reuse path.

With ``sp_group=None`` (or a group of one rank) the same class is the plain
single-process model: no collective, same parameters for the same ``seed``. Attention
sees keys in a rank-major order under SP; with no position bias inside attention this
is a permutation of the keys, so outputs match the single-process model up to float
rounding.

``forward(x, timestep, encoder_hidden_states)``; :func:`make_inputs` gives seeded inputs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import get_2d_sincos_pos_embed, init_random_, timestep_embedding

__all__ = ["SPVideoDiT", "SPBlock", "make_inputs", "init_random_"]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class _SP:
    """The sequence-parallel context of one model: group, rank, size (Python constants
    while tracing, so the graph is specialised per rank)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if group is not None and dist.is_available() and dist.is_initialized():
            self.group = group
            self.size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        else:
            self.group, self.size, self.rank = None, 1, 0

    @property
    def on(self) -> bool:
        return self.size > 1

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Exchange equal chunks of dim 0 (chunk ``p`` goes to rank ``p``)."""
        from torch.distributed import _functional_collectives as funcol

        out = funcol.all_to_all_single(x.contiguous(), None, None, self.group)
        return funcol.wait_tensor(out)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along dim 0, in rank order."""
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), 0, self.group))


class UlyssesAttention(nn.Module):
    """Self-attention over the full (sharded) sequence with Ulysses all-to-all."""

    def __init__(self, dim: int, num_heads: int, sp: _SP):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sp = sp
        assert num_heads % sp.size == 0, "num_heads must be divisible by the SP size"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, C = x.shape                   # n = N / P local tokens
        H, hd, P = self.num_heads, self.head_dim, self.sp.size
        qkv = self.qkv(x)
        if not self.sp.on:
            q, k, v = qkv.reshape(B, n, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)            # (B, H, n, hd)
            return self.proj(out.transpose(1, 2).reshape(B, n, C))
        h = H // P
        # (B, n, 3, P, h, hd) -> (P, n, B, 3, h, hd): head group p goes to rank p
        send = qkv.reshape(B, n, 3, P, h, hd).permute(3, 1, 0, 2, 4, 5)
        recv = self.sp.all_to_all(send)                               # dim 0: source rank = sequence chunk
        # (P, n, B, 3, h, hd) -> (3, B, h, P*n, hd)
        q, k, v = recv.permute(3, 2, 4, 0, 1, 5).reshape(3, B, h, P * n, hd).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)                 # (B, h, N, hd)
        # (B, h, P, n, hd) -> (P, n, B, h, hd): sequence chunk p goes back to rank p
        send = out.reshape(B, h, P, n, hd).permute(2, 3, 0, 1, 4)
        recv = self.sp.all_to_all(send)                               # dim 0: source rank = head group
        out = recv.permute(2, 1, 0, 3, 4).reshape(B, n, C)            # heads in order p*h + j
        return self.proj(out)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, n, C = x.shape
        L = y.shape[1]
        q = self.q(x).reshape(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(y).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, n, C))


class SPBlock(nn.Module):
    """adaLN block: Ulysses self-attention (gated), cross-attention, MLP (gated)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sp: _SP):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = UlyssesAttention(dim, num_heads, sp)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        B, n, C = x.shape
        mod = self.scale_shift_table[None] + t0.reshape(B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y)
        x = x + gate_mlp * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class SPVideoDiT(nn.Module):
    """Video DiT for latents ``(B, C, T, H, W)``, sequence-parallel over ``sp_group``."""

    def __init__(self, input_size: int = 8, in_channels: int = 4, patch_size: int = 2, hidden_size: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, caption_channels: int = 32,
                 sp_group=None, seed: int = 0):
        super().__init__()
        self.sp = _SP(sp_group)
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.grid_size = input_size // patch_size
        S = self.grid_size ** 2
        assert S % self.sp.size == 0, f"{S} spatial tokens per frame do not split over {self.sp.size} ranks"
        self.x_embedder = nn.Conv3d(in_channels, hidden_size, kernel_size=(1, patch_size, patch_size),
                                    stride=(1, patch_size, patch_size))
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, self.grid_size)[None, None],
                             persistent=False)  # (1, 1, S, D)
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_proj = nn.Sequential(nn.Linear(caption_channels, hidden_size), nn.GELU(approximate="tanh"),
                                    nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList([SPBlock(hidden_size, num_heads, mlp_ratio, self.sp) for _ in range(depth)])
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        init_random_(self, seed)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        B, _, T, Hl, Wl = x.shape
        p, P, r = self.patch_size, self.sp.size, self.sp.rank
        Hp, Wp = Hl // p, Wl // p
        S = Hp * Wp
        s = S // P

        x = self.x_embedder(x).flatten(3).permute(0, 2, 3, 1)       # (B, T, S, D)
        x = x + self.pos_embed
        if self.sp.on:                                               # spatial shard of every frame
            x = x[:, :, r * s:(r + 1) * s]
        x = x.reshape(B, T * s, self.hidden_size)                    # frame-major local tokens

        t = self.t_mlp(timestep_embedding(timestep, 256))
        t0 = self.t_block(t)
        y = self.y_proj(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, y, t0)

        shift, scale = (self.final_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.final_linear(_modulate(self.norm_final(x), shift, scale))  # (B, T*s, p*p*C)
        c = x.shape[-1]
        if self.sp.on:
            x = self.sp.all_gather(x)                                # (P*B, T*s, c), rank order
            x = x.reshape(P, B, T, s, c).permute(1, 2, 0, 3, 4)      # (B, T, P, s, c)
        x = x.reshape(B, T, Hp, Wp, p, p, self.out_channels)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)                           # (B, C, T, Hp, p, Wp, p)
        return x.reshape(B, self.out_channels, T, Hp * p, Wp * p)


def make_inputs(batch: int, t: float, *, frames: int = 4, input_size: int = 8, in_channels: int = 4,
                text_len: int = 6, caption_channels: int = 32, seed: int = 0, noise: Optional[float] = None):
    """Seeded inputs for one denoising step: the latent drifts slowly with ``t`` (so that
    the probe residual changes little between steps), the text is fixed."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, in_channels, frames, input_size, input_size, generator=gen)
    drift = torch.randn(batch, in_channels, frames, input_size, input_size, generator=gen)
    text = torch.randn(batch, text_len, caption_channels, generator=gen)
    scale = 0.002 if noise is None else noise
    x = base + scale * (1000.0 - t) / 10.0 * drift
    return (x, torch.full((batch,), float(t)), text), {}

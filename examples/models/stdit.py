"""A spatial-temporal video DiT in the style of Open-Sora's STDiT3, written here from its description.

Layout and data flow:

* input latents ``(B, C, T, H, W)``; a Conv3d patch embedding with patch ``(1, 2, 2)`` gives
  tokens laid out ``(B, T*S, D)`` (frame-major: all S spatial tokens of frame 0, then frame 1...);
* a fixed 2D sin-cos spatial position embedding (buffer) is added to every frame;
* ``self.spatial_blocks`` and ``self.temporal_blocks``: two ``nn.ModuleList`` of the same
  :class:`STDiT3Block` class, distinguished by their ``temporal: bool`` attribute.
  The forward loops ``for sb, tb in zip(spatial_blocks, temporal_blocks)``:
  ``x = sb(x, y, t0, T, S); x = tb(x, y, t0, T, S)``;
* each block: adaLN from a learned ``scale_shift_table`` (6, D) plus the shared timestep
  modulation ``t0`` (B, 6*D); self-attention over the S tokens of each frame (spatial block,
  ``(B, T*S, D) -> (B*T, S, D)``) or over the T frames at each position (temporal block,
  ``(B, T*S, D) -> (B*S, T, D)``), residual add with a gate; cross-attention to the text tokens
  ``y`` (B, L, D) with a plain residual add; MLP with a gate;
* timestep embedder (sinusoidal -> MLP), ``t_block`` (SiLU -> Linear to 6*D), a caption
  projection (Linear text dim -> D, then GELU -> Linear), final layer (adaLN with its own
  ``scale_shift_table``, linear, unpatchify back to ``(B, C_out, T, H, W)``).

``forward(x, timestep, encoder_hidden_states)`` uses tensor operations only, so the model
traces into one Dynamo graph with ``fullgraph=True``. Every gate and output projection
is an ordinary parameter; :func:`init_random_` gives them seeded non-zero values (the
Open-Sora init zero-initialises cross-attention output and the final layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import get_2d_sincos_pos_embed, init_random_, timestep_embedding

__all__ = ["STDiT3", "STDiT3Block", "T2IFinalLayer", "init_random_", "t2i_modulate"]


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PixArt-style modulation; shift/scale are (B, 1, D)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Self-attention over the middle axis of a (B', N, D) tensor."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MultiHeadCrossAttention(nn.Module):
    """Cross-attention from video tokens (B, N, D) to text tokens (B, L, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        L = cond.shape[1]
        q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(cond).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class STDiT3Block(nn.Module):
    """One spatial (``temporal=False``) or temporal (``temporal=True``) STDiT3 block."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, temporal: bool = False,
                 qk_norm: bool = True):
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, T: int, S: int) -> torch.Tensor:
        """x: (B, T*S, D); y: (B, L, D) projected text; t0: (B, 6*D) timestep modulation."""
        B, N, C = x.shape
        mod = self.scale_shift_table[None] + t0.reshape(B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # each (B, 1, C)

        # self-attention: within each frame (spatial) or across frames per position (temporal)
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:
            # (B, T*S, C) -> (B, T, S, C) -> (B, S, T, C) -> (B*S, T, C)
            h = x_m.reshape(B, T, S, C).permute(0, 2, 1, 3).reshape(B * S, T, C)
            h = self.attn(h)
            h = h.reshape(B, S, T, C).permute(0, 2, 1, 3).reshape(B, T * S, C)
        else:
            # (B, T*S, C) -> (B*T, S, C)
            h = x_m.reshape(B * T, S, C)
            h = self.attn(h)
            h = h.reshape(B, T * S, C)
        x = x + gate_msa * h

        # cross-attention to text tokens: plain residual add
        x = x + self.cross_attn(x, y)

        # MLP
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * self.mlp(x_m)
        return x


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects text encoder states (B, L, caption_channels) to (B, L, D)."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(caption_channels, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class T2IFinalLayer(nn.Module):
    """adaLN with a ``scale_shift_table`` (2, D) + timestep embedding, then a linear projection."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class STDiT3(nn.Module):
    """Spatial-temporal DiT for video latents (B, C, T, H, W)."""

    def __init__(
        self,
        input_size: tuple[int, int] | int = (32, 32),
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        pred_sigma: bool = True,
        qk_norm: bool = True,
        init: str = "default",
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.pred_sigma = pred_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.patch_size = tuple(patch_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        assert input_size[0] % patch_size[1] == 0 and input_size[1] % patch_size[2] == 0
        assert input_size[0] // patch_size[1] == input_size[1] // patch_size[2], "square spatial grids only"
        self.grid_size = input_size[0] // patch_size[1]

        self.x_embedder = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)
        self.register_buffer(
            "pos_embed", get_2d_sincos_pos_embed(hidden_size, self.grid_size)[None, None], persistent=False
        )  # (1, 1, S, D)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)

        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, mlp_ratio, temporal=False, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, mlp_ratio, temporal=True, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)

        if init == "default":
            self.initialize_weights()
        elif init == "random":
            init_random_(self, seed)
        else:
            raise ValueError(f"init must be 'default' or 'random', got {init!r}")

    def initialize_weights(self) -> None:
        """Open-Sora-like init: xavier linears, zero cross-attn projections, zero final linear,
        zero temporal attention output (so temporal blocks start as identity on attention)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj[0].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj[2].weight, std=0.02)
        for blocks in (self.spatial_blocks, self.temporal_blocks):
            for block in blocks:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
        """(B, T*S, pt*ph*pw*C) -> (B, C, T*pt, H*ph, W*pw) with T, H, W in patches."""
        pt, ph, pw = self.patch_size
        c = self.out_channels
        B = x.shape[0]
        x = x.reshape(B, T, H, W, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, T, pt, H, ph, W, pw
        return x.reshape(B, c, T * pt, H * ph, W * pw)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W); timestep: (B,); encoder_hidden_states: (B, L, caption_channels)."""
        B = x.shape[0]
        pt, ph, pw = self.patch_size
        T, Hp, Wp = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        S = Hp * Wp

        x = self.x_embedder(x)  # (B, D, T, Hp, Wp)
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T, S, D)
        x = (x + self.pos_embed).reshape(B, T * S, self.hidden_size)

        t = self.t_embedder(timestep)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        y = self.y_embedder(encoder_hidden_states)  # (B, L, D)

        for sb, tb in zip(self.spatial_blocks, self.temporal_blocks):
            x = sb(x, y, t0, T, S)
            x = tb(x, y, t0, T, S)

        x = self.final_layer(x, t)
        return self.unpatchify(x, T, Hp, Wp)

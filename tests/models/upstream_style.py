"""Toy models, written here, that reproduce what model code as its authors wrote it does and our
earlier re-creations did not (issue 26; no upstream code):

* ``AlternatingDiT``: Open-Sora 1.2's STDiT3 as the AdaCache paper's repository publishes it: the
  spatial and temporal blocks live in two lists and alternate (``spatial[i] -> temporal[i] ->
  spatial[i+1]``); every block takes and returns a dict of side state (``ada_dict``) and is called
  through a wrapper that checks a flag and calls ``torch.utils.checkpoint`` when it is set; the
  position embedding is computed with numpy behind ``functools.lru_cache``; the caption lengths
  are read with ``.tolist()`` and every cross-attention builds its block-diagonal mask from that
  Python list (xformers' ``BlockDiagonalMask.from_seqlens``), which breaks Dynamo's graph inside
  every block even with data-dependent capture.
* ``RotaryListDiT``: Wan 2.1's official code: every block reads the grid sizes with ``.tolist()``
  and loops over them in Python to apply its rotary table per sample; each block also counts its
  calls in a module attribute, as STDiT3's do (``self.fwd_id += 1``).
* ``PerFrameDiT``: a per-frame timestep ``(B, F)`` whose first frame is pinned at 0 (the clean
  conditioning frame of image-to-video), or each frame at its own noise level (diffusion forcing).
* ``CheckpointedDiT``: blocks called through ``torch.utils.checkpoint.checkpoint`` unconditionally.

Only the blocks run ``scaled_dot_product_attention`` (``BLOCK_ATTENTION`` times each), so the
profiler's count of it (``helpers.count_ops``) counts block executions independently of the library.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@functools.lru_cache(maxsize=8)
def _sincos_table(length: int, dim: int, scale: float) -> np.ndarray:
    position = np.arange(length, dtype=np.float64)[:, None] / scale
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = position * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def auto_checkpoint(module: nn.Module, *args):
    """Open-Sora's wrapper: checkpoint when the module's flag is set."""
    if getattr(module, "grad_checkpointing", False):
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def block_diagonal_attention(q, k, v, q_lens: list, kv_lens: list):
    """Attention of packed sequences, each query segment on its own key segment only (the mask
    built from Python lists of lengths, as xformers' ``BlockDiagonalMask.from_seqlens``)."""
    mask = torch.full((sum(q_lens), sum(kv_lens)), float("-inf"))
    qs = ks = 0
    for ql, kl in zip(q_lens, kv_lens):
        mask[qs:qs + ql, ks:ks + kl] = 0.0
        qs, ks = qs + ql, ks + kl
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class AlternatingBlock(nn.Module):
    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.cproj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, t, ada_dict, y_lens, T: int, S: int):
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        h = h.reshape(B, T, S, C).transpose(1, 2).reshape(B * S, T, C) if self.temporal else h.reshape(B * T, S, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = self.proj(F.scaled_dot_product_attention(q, k, v))
        a = a.reshape(B, S, T, C).transpose(1, 2).reshape(B, N, C) if self.temporal else a.reshape(B, N, C)
        x = x + gate_msa * a
        # cross-attention over the packed captions: block-diagonal from the Python lengths
        q = self.q(x).reshape(1, B * N, C)
        k, v = self.kv(y).chunk(2, dim=-1)
        c = block_diagonal_attention(q, k, v, [N] * B, y_lens)
        x = x + self.cproj(c).reshape(B, N, C)
        m = self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        x = x + gate_mlp * m
        return x, ada_dict


class AlternatingDiT(nn.Module):
    """STDiT3's structure: ``forward(x (B, C, T, H, W), timestep (B,), y (B, L, Cy), mask (B, L))``."""

    def __init__(self, in_channels: int = 4, dim: int = 32, depth: int = 3, caption_channels: int = 16,
                 checkpointing: bool = False):
        super().__init__()
        self.dim = dim
        self.x_embedder = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = nn.Linear(caption_channels, dim)
        self.spatial_blocks = nn.ModuleList(AlternatingBlock(dim, temporal=False) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(AlternatingBlock(dim, temporal=True) for _ in range(depth))
        self.final = nn.Linear(dim, in_channels * 4)
        for block in [*self.spatial_blocks, *self.temporal_blocks]:
            block.grad_checkpointing = checkpointing

    def forward(self, x, timestep, y, mask):
        B, Cin, T, H, W = x.shape
        S = (H // 2) * (W // 2)
        pos = torch.from_numpy(_sincos_table(S, self.dim, float(round(S ** 0.5))))
        t = self.t_embedder(timestep_embedding(timestep, self.dim))
        t_mlp = self.t_block(t)
        y = self.y_embedder(y)
        y_lens = mask.sum(dim=1).tolist()
        y = y.masked_select(mask.unsqueeze(-1) != 0).view(1, -1, self.dim)
        x = self.x_embedder(x).flatten(3).transpose(1, 2)   # B, T, S, C
        x = (x.transpose(1, 2) if x.shape[1] != T else x)
        x = x.reshape(B, T, S, self.dim) + pos
        x = x.reshape(B, T * S, self.dim)
        ada_dict = {"avg_diff": 0, "count": 0, "gain": 1.0}
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x, ada_dict = auto_checkpoint(spatial, x, y, t_mlp, ada_dict, y_lens, T, S)
            x, ada_dict = auto_checkpoint(temporal, x, y, t_mlp, ada_dict, y_lens, T, S)
        x = x * ada_dict["gain"]   # the model reads the side state the blocks hand back
        x = self.final(x)   # B, T*S, Cin*4
        x = x.reshape(B, T, H // 2, W // 2, Cin, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, Cin, T, H, W)


def alternating_inputs(batch: int = 1, frames: int = 3, seed: int = 0, lens=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 4, 4, generator=g)
    y = torch.randn(batch, 6, 16, generator=g)
    mask = torch.zeros(batch, 6, dtype=torch.long)
    for b in range(batch):
        mask[b, :lens[b % len(lens)]] = 1
    return x, y, mask


def rotary_per_sample(x, grid_sizes, freqs):
    """Rotate the first ``f * h * w`` tokens of each sample by its own grid's table, in complex
    float64, the rest unchanged: a Python loop over ``grid_sizes.tolist()`` (the sizes become
    data-dependent symbols under capture, and the views over them break the graph)."""
    out = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        n = f * h * w
        xi = torch.view_as_complex(x[i, :n].to(torch.float64).reshape(n, -1, 2))
        table = freqs[:f].view(f, 1, 1, -1).expand(f, h, w, -1).reshape(n, -1)
        xi = torch.view_as_real(xi * table).flatten(1)
        if n < x.shape[1]:   # padding tokens after the sample's own
            xi = torch.cat([xi, x[i, n:].to(torch.float64)])
        out.append(xi)
    return torch.stack(out).float()


class RotaryListBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 3, dim) / dim ** 0.5)

    fwd_id, num_sampling_steps = 0, 100   # a call counter in the module, as STDiT3's blocks keep one

    def forward(self, x, e, grid_sizes, freqs):
        self.fwd_id += 1
        if self.fwd_id == self.num_sampling_steps:
            self.fwd_id = 0
        shift, scale, gate = (self.modulation + e.unsqueeze(1)).chunk(3, dim=1)
        q, k, v = self.qkv(self.norm(x) * (1 + scale) + shift).chunk(3, dim=-1)
        q, k = rotary_per_sample(q, grid_sizes, freqs), rotary_per_sample(k, grid_sizes, freqs)
        x = x + gate * self.o(F.scaled_dot_product_attention(q, k, v))
        return x + self.ffn(self.norm(x))


class _TokenDiT(nn.Module):
    """A patch embedding, a timestep MLP, ``depth`` blocks of ``block`` in ``blocks`` and a head."""

    def __init__(self, block: type, dim: int, depth: int, in_dim: int):
        super().__init__()
        self.dim = dim
        self.patch = nn.Linear(in_dim, dim)
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, in_dim)


class RotaryListDiT(_TokenDiT):
    """Wan 2.1's structure: ``forward(x (B, N, C_in), t (B,), grid_sizes (B, 3) long: frames, 1, 1)``."""

    def __init__(self, dim: int = 32, depth: int = 4, in_dim: int = 8):
        super().__init__(RotaryListBlock, dim, depth, in_dim)

    def forward(self, x, t, grid_sizes):
        e = self.time(timestep_embedding(t, self.dim))
        h = self.patch(x)
        angles = torch.arange(h.shape[1], dtype=torch.float64)[:, None] * torch.linspace(0.1, 1.0, self.dim // 2,
                                                                                            dtype=torch.float64)
        freqs = torch.polar(torch.ones_like(angles), angles)   # (max frames, dim / 2) complex
        for block in self.blocks:
            h = block(h, e, grid_sizes, freqs)
        return self.head(h)


class PerFrameBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x, emb):
        shift, scale = self.ada(emb).chunk(2, dim=-1)   # per token: B, N, C
        h = self.norm(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v)
        return x + self.mlp(self.norm(x))


class PerFrameDiT(_TokenDiT):
    """``forward(x (B, F, P, C_in), timestep (B, F))``: each frame embeds its own timestep."""

    def __init__(self, dim: int = 32, depth: int = 4, in_dim: int = 8):
        super().__init__(PerFrameBlock, dim, depth, in_dim)

    def forward(self, x, timestep):
        B, Fr, P, _ = x.shape
        emb = self.time(timestep_embedding(timestep, self.dim))          # B, F, C
        emb = emb[:, :, None].expand(B, Fr, P, self.dim).reshape(B, Fr * P, self.dim)
        h = self.patch(x).reshape(B, Fr * P, self.dim)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h).reshape(x.shape)


class CheckpointedDiT(_TokenDiT):
    """``forward(x (B, N, C_in), timestep (B,))``, every block through ``checkpoint``."""

    def __init__(self, dim: int = 32, depth: int = 4, in_dim: int = 8, use_reentrant: bool = False):
        super().__init__(PerFrameBlock, dim, depth, in_dim)
        self.use_reentrant = use_reentrant

    def forward(self, x, timestep):
        emb = self.time(timestep_embedding(timestep, self.dim))[:, None].expand(-1, x.shape[1], -1)
        h = self.patch(x)
        for block in self.blocks:
            h = checkpoint(block, h, emb, use_reentrant=self.use_reentrant)
        return self.head(h)


#: ``scaled_dot_product_attention`` calls per block execution, per model class
BLOCK_ATTENTION = {"AlternatingDiT": 2, "RotaryListDiT": 1, "PerFrameDiT": 1, "CheckpointedDiT": 1}

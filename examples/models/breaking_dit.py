"""A small video DiT written the way research code often is: it breaks Dynamo's graph in
every block under ``torch.compile``'s default config.

Each construct is one switch, so a test or a benchmark can take them one at a time:

* ``rope_tolist``: the rotary embedding reads the per-sample grid sizes with
  ``grid_sizes.tolist()`` and builds its table from Python ints, in every block's attention
  (as the official Wan 2.1 code does);
* ``mask_item``: joint attention over the video tokens and the *valid* text tokens only: their
  count comes from ``context_mask.sum().item()`` and the text is sliced to it (as Mochi's
  attention-mask handling does);
* ``mask_nonzero``: the valid text tokens are gathered by ``nonzero`` indices instead;
* ``moe``: the MLP is a top-k mixture of experts; each expert runs on the tokens routed to it,
  found with ``nonzero`` (Nucleus-style routing);
* ``moe_loop``: the same experts dispatched as HiDream-Image's inference code does: the routed
  tokens sorted by expert, the per-expert counts read with ``bincount().tolist()`` and a Python
  loop over them that skips empty experts. A Python ``if`` on a tensor's value: no capture
  setting keeps it in the graph, so every block spans several graphs.

``forward(x, timestep, grid_sizes, context, context_mask)``: ``x`` is a video
``(B, C, F, H, W)``, ``grid_sizes`` ``(B, 3)`` int64 (``F, H, W`` per sample), ``context``
``(B, L, D)`` text tokens and ``context_mask`` ``(L,)`` bool (the valid ones, shared by the
batch). Without a mask construct, attention runs over the video and all text tokens.
Returns ``(B, C, F, H, W)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BreakingDiT", "BreakingBlock", "make_inputs"]


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    e = t.float()[:, None] * freqs[None]
    return torch.cat([e.cos(), e.sin()], dim=-1)


def _rope_table(grid_sizes: torch.Tensor, head_dim: int, tokens: int) -> tuple:
    """cos/sin (1, N, 1, head_dim) for the first sample's grid, from Python ints (``tolist``)."""
    f, h, w = grid_sizes[0].tolist()
    pos = torch.arange(f * h * w, device=grid_sizes.device, dtype=torch.float32)
    pos = F.pad(pos, (0, tokens - f * h * w))
    freqs = torch.exp(-math.log(100.0) * torch.arange(head_dim // 2, dtype=torch.float32,
                                                       device=grid_sizes.device) / (head_dim // 2))
    angles = pos[:, None] * freqs[None]
    return angles.cos().repeat(1, 2)[None, :, None], angles.sin().repeat(1, 2)[None, :, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class Experts(nn.Module):
    """Top-k mixture of experts over the tokens of ``(B, N, C)``."""

    def __init__(self, c: int, n_experts: int = 3, top_k: int = 2, python_loop: bool = False):
        super().__init__()
        self.python_loop = python_loop
        self.router = nn.Linear(c, n_experts)
        self.up = nn.ModuleList([nn.Linear(c, 2 * c) for _ in range(n_experts)])
        self.down = nn.ModuleList([nn.Linear(2 * c, c) for _ in range(n_experts)])
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        if self.python_loop:
            return self._sorted_dispatch(flat, weights, chosen).reshape(x.shape)
        out = torch.zeros_like(flat)
        for e, (up, down) in enumerate(zip(self.up, self.down)):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            y = down(F.gelu(up(flat[token]))) * weights[token, slot, None]
            out = out.index_add(0, token, y)
        return out.reshape(x.shape)

    def _sorted_dispatch(self, flat, weights, chosen):
        order = chosen.flatten().argsort()
        ends = chosen.flatten().bincount(minlength=len(self.up)).cumsum(0).tolist()
        out = torch.zeros_like(flat)
        start = 0
        for e, end in enumerate(ends):
            if end == start:   # a Python branch on a routed count: Dynamo breaks the graph here
                continue
            slots = order[start:end]
            token = slots // self.top_k
            y = self.down[e](F.gelu(self.up[e](flat[token]))) * weights.flatten()[slots, None]
            out = out.index_add(0, token, y)
            start = end
        return out


class BreakingBlock(nn.Module):
    def __init__(self, c: int, heads: int, rope_tolist: bool, mask_item: bool, mask_nonzero: bool, moe: bool,
                 moe_loop: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c, elementwise_affine=False), nn.LayerNorm(c, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.kv_context = nn.Linear(c, 2 * c)
        self.mlp = (Experts(c, python_loop=moe_loop) if moe or moe_loop
                    else nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)))
        self.ada = nn.Linear(c, 4 * c)
        self.heads = heads
        self.rope_tolist, self.mask_item, self.mask_nonzero = rope_tolist, mask_item, mask_nonzero

    def attention(self, h: torch.Tensor, grid_sizes: torch.Tensor, context: torch.Tensor,
                  context_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        if self.rope_tolist:
            cos, sin = _rope_table(grid_sizes, c // self.heads, n)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.mask_item:        # the valid text tokens come first: slice to their count
            context = context[:, : int(context_mask.sum().item())]
        elif self.mask_nonzero:   # gather the valid text tokens by index
            context = context.index_select(1, torch.nonzero(context_mask).squeeze(1))
        k_txt, v_txt = self.kv_context(context).reshape(b, -1, 2, self.heads, c // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, torch.cat([k, k_txt], 1), torch.cat([v, v_txt], 1)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x, temb, grid_sizes, context, context_mask):
        shift, scale, gate_attn, gate_mlp = self.ada(temb)[:, None].chunk(4, dim=-1)
        x = x + gate_attn * self.attention(self.norm1(x) * (1 + scale) + shift, grid_sizes, context, context_mask)
        return x + gate_mlp * self.mlp(self.norm2(x))


class BreakingDiT(nn.Module):
    def __init__(self, in_channels: int = 3, dim: int = 32, heads: int = 2, depth: int = 4, context_dim: int = 16, *,
                 rope_tolist: bool = False, mask_item: bool = False, mask_nonzero: bool = False, moe: bool = False,
                 moe_loop: bool = False):
        super().__init__()
        self.embed = nn.Linear(in_channels, dim)
        self.embed_context = nn.Linear(context_dim, dim)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([BreakingBlock(dim, heads, rope_tolist, mask_item, mask_nonzero, moe, moe_loop)
                                     for _ in range(depth)])
        self.out = nn.Linear(dim, in_channels)
        self.dim = dim

    def forward(self, x, timestep, grid_sizes, context, context_mask):
        b, c, f, h, w = x.shape
        temb = self.t_mlp(sinusoid(timestep, self.dim))
        tokens = self.embed(x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c))
        context = self.embed_context(context)
        for block in self.blocks:
            tokens = block(tokens, temb, grid_sizes, context, context_mask)
        out = self.out(tokens) * (1 + temb.mean(-1))[:, None, None]
        return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def make_inputs(batch: int, timestep: float, *, frames: int = 3, height: int = 4, width: int = 5, channels: int = 3,
                text_tokens: int = 7, valid: int = 5, context_dim: int = 16, seed: int = 0) -> tuple:
    """Seeded inputs: a video, the timestep, its grid sizes, text tokens and their mask (the
    first ``valid`` text tokens are valid, the rest padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, frames, height, width, generator=g)
    context = torch.randn(batch, text_tokens, context_dim, generator=g)
    mask = torch.zeros(text_tokens, dtype=torch.bool)
    mask[:valid] = True
    grid = torch.tensor([[frames, height, width]] * batch)
    return x, torch.full((batch,), float(timestep)), grid, context, mask

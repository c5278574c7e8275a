"""Small hand-written models for pass and runtime tests (shapes chosen odd on purpose)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    e = t[:, None].float() * freqs[None]
    return torch.cat([e.cos(), e.sin()], dim=-1)


class Block(nn.Module):
    """x + attn(x) + mlp(x); uses the time embedding only if ``use_t``."""

    def __init__(self, c, use_t=True):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.use_t = use_t

    def forward(self, x, temb):
        h = self.norm1(x)
        if self.use_t:
            h = h * (1 + temb[:, None])
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        x = x + self.mlp(self.norm2(x))
        return x


class ToyDiT(nn.Module):
    """Image-like DiT on (B, N, Cin) tokens; ``use_t=False`` keeps the time out of the blocks."""

    def __init__(self, cin=5, c=24, depth=4, use_t=True):
        super().__init__()
        self.embed = nn.Linear(cin, c)
        self.t_mlp = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList([Block(c, use_t) for _ in range(depth)])
        self.out = nn.Linear(c, cin)
        self.c = c

    def forward(self, x, timestep):
        temb = self.t_mlp(sinusoid(timestep, self.c))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h) * (1 + temb.mean(-1))[:, None, None]


class ToyLatte(nn.Module):
    """Latte-like video model: spatial and temporal blocks in two lists, rearranges between
    them, a temporal position embedding added before the first temporal block, and the
    region's output in the temporal layout. Input (B, C, F, H, W)."""

    def __init__(self, cin=3, c=16, depth=2, frames=3, use_t=True):
        super().__init__()
        self.embed = nn.Conv2d(cin, c, 1)
        self.t_mlp = nn.Linear(c, c)
        self.spatial = nn.ModuleList([Block(c, use_t) for _ in range(depth)])
        self.temporal = nn.ModuleList([Block(c, use_t) for _ in range(depth)])
        self.temp_pos = nn.Parameter(torch.randn(1, frames, c) * 0.1)
        self.out = nn.Linear(c, cin)
        self.c = c

    def forward(self, x, timestep):
        b, cin, f, hh, ww = x.shape
        temb = self.t_mlp(sinusoid(timestep, self.c))
        h = self.embed(x.permute(0, 2, 1, 3, 4).reshape(b * f, cin, hh, ww))   # (B*F, C, H, W)
        h = h.flatten(2).transpose(1, 2)                                        # (B*F, S, C)
        s = hh * ww
        t_sp = temb.repeat_interleave(f, dim=0)
        t_tm = temb.repeat_interleave(s, dim=0)
        for i, (sb, tb) in enumerate(zip(self.spatial, self.temporal)):
            h = sb(h, t_sp)
            h = h.reshape(b, f, s, self.c).permute(0, 2, 1, 3).reshape(b * s, f, self.c)
            if i == 0:
                h = h + self.temp_pos
            h = tb(h, t_tm)
            if i + 1 < len(self.spatial):
                h = h.reshape(b, s, f, self.c).permute(0, 2, 1, 3).reshape(b * f, s, self.c)
        h = h.reshape(b, s, f, self.c).permute(0, 2, 1, 3)   # (B, F, S, C)
        out = self.out(h)                                     # (B, F, S, Cin)
        return out.permute(0, 3, 1, 2).reshape(b, cin, f, hh, ww)


class ToyDualStream(nn.Module):
    """MMDiT/Flux-like: double-stream blocks update image and text tokens with joint
    attention, then a concat, then single-stream blocks, then the text is dropped."""

    def __init__(self, c=16, depth_double=2, depth_single=2):
        super().__init__()
        self.img_in, self.txt_in = nn.Linear(4, c), nn.Linear(6, c)
        self.t_mlp = nn.Linear(c, c)
        self.double_blocks = nn.ModuleList([DoubleBlock(c) for _ in range(depth_double)])
        self.single_blocks = nn.ModuleList([Block(c) for _ in range(depth_single)])
        self.out = nn.Linear(c, 4)
        self.c = c

    def forward(self, img, txt, timestep):
        temb = self.t_mlp(sinusoid(timestep, self.c))
        x, ctx = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            x, ctx = block(x, ctx, temb)
        h = torch.cat([ctx, x], dim=1)
        for block in self.single_blocks:
            h = block(h, temb)
        return self.out(h[:, ctx.shape[1]:])


class DoubleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_x, self.n_c = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv_x, self.qkv_c = nn.Linear(c, 3 * c), nn.Linear(c, 3 * c)
        self.o_x, self.o_c = nn.Linear(c, c), nn.Linear(c, c)
        self.mlp_x, self.mlp_c = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x, ctx, temb):
        n = ctx.shape[1]
        qkv = torch.cat([self.qkv_c(self.n_c(ctx)), self.qkv_x(self.n_x(x) * (1 + temb[:, None]))], dim=1)
        q, k, v = qkv.chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v)
        ctx = ctx + self.o_c(a[:, :n])
        x = x + self.o_x(a[:, n:])
        return x + self.mlp_x(x), ctx + self.mlp_c(ctx)


class ToySkipDiT(nn.Module):
    """U-ViT / HunyuanDiT-like long skips: early block outputs feed late blocks, so the
    early blocks' outputs leave any region that does not also hold the late blocks."""

    def __init__(self, c=16, depth=4):
        super().__init__()
        self.embed = nn.Linear(5, c)
        self.t_mlp = nn.Linear(c, c)
        self.blocks = nn.ModuleList([Block(c) for _ in range(depth)])
        self.skip = nn.Linear(2 * c, c)
        self.out = nn.Linear(c, 5)
        self.c = c

    def forward(self, x, timestep):
        temb = self.t_mlp(sinusoid(timestep, self.c))
        h = self.embed(x)
        h0 = self.blocks[0](h, temb)
        h1 = self.blocks[1](h0, temb)
        h2 = self.blocks[2](h1, temb)
        h3 = self.blocks[3](self.skip(torch.cat([h2, h0], -1)), temb)
        return self.out(h3) + self.out(h0)


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 5)

    def forward(self, x, timestep):
        return self.b(torch.relu(self.a(x))) * timestep[:, None, None]


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


class RotaryBlock(Block):
    """A block whose attention input goes through an in-place rotary-style write
    (``out[..., 0::2] = ...``, as diffusers' Wan does): impure nodes inside the block."""

    def forward(self, x, temb):
        h = self.norm1(x)
        rot = torch.empty_like(h)
        rot[..., 0::2] = h[..., 0::2] * 0.8 - h[..., 1::2] * 0.6
        rot[..., 1::2] = h[..., 0::2] * 0.6 + h[..., 1::2] * 0.8
        q, k, v = self.qkv(rot * (1 + temb[:, None])).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(self.norm2(x))


class ToyRotaryDiT(ToyDiT):
    def __init__(self, depth=4):
        super().__init__(depth=depth)
        self.blocks = nn.ModuleList([RotaryBlock(self.c) for _ in range(depth)])


class ToyJointVideo(nn.Module):
    """HunyuanVideo / CogVideoX-style video model: patch tokens (F*H*W of them) joined with
    text tokens along the token dim, blocks over the joint sequence, then a slice back to the
    video tokens. ``text_first``: cat([text, video]) (CogVideoX) or cat([video, text]);
    ``split_before_blocks``: split the video tokens out again before the blocks."""

    def __init__(self, cin=3, c=16, depth=2, text_len=5, text_first=True, split_before_blocks=False):
        super().__init__()
        self.embed = nn.Linear(cin, c)
        self.text = nn.Parameter(torch.randn(text_len, c))
        self.t = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList([Block(c) for _ in range(depth)])
        self.out = nn.Linear(c, cin)
        self.c, self.text_len = c, text_len
        self.text_first, self.split_before_blocks = text_first, split_before_blocks

    def forward(self, x, timestep):
        b, cin, f, h, w = x.shape
        vid = self.embed(x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, cin))
        text = self.text.expand(b, -1, -1)
        joint = torch.cat([text, vid] if self.text_first else [vid, text], dim=1)
        temb = self.t(sinusoid(timestep, self.c))
        if self.split_before_blocks:
            parts = joint.split([self.text_len, f * h * w] if self.text_first else [f * h * w, self.text_len], dim=1)
            joint = parts[1] if self.text_first else parts[0]
        for blk in self.blocks:
            joint = blk(joint, temb)
        if not self.split_before_blocks:
            joint = joint[:, self.text_len:] if self.text_first else joint[:, :f * h * w]
        return self.out(joint).reshape(b, f, h, w, cin).permute(0, 4, 1, 2, 3)


class ToyShardedTokens(nn.Module):
    """A sequence-parallel split without the collectives: the video tokens ``(B, F*H*W, C)``, of
    which the blocks see piece ``index`` of ``shards`` equal pieces (``chunk``, or the same range
    as a slice with ``slice_=True``), as one rank of a context-parallel job does."""

    def __init__(self, cin=3, c=16, depth=2, shards=2, index=1, slice_=False):
        super().__init__()
        self.embed = nn.Linear(cin, c)
        self.t = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList([Block(c) for _ in range(depth)])
        self.out = nn.Linear(c, cin)
        self.c, self.shards, self.index, self.slice_ = c, shards, index, slice_

    def forward(self, x, timestep):
        b, cin, f, h, w = x.shape
        tok = self.embed(x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, cin))
        if self.slice_:
            n = tok.shape[1] // self.shards
            tok = tok[:, self.index * n:(self.index + 1) * n]
        else:
            tok = tok.chunk(self.shards, dim=1)[self.index]
        temb = self.t(sinusoid(timestep, self.c))
        for blk in self.blocks:
            tok = blk(tok, temb)
        return self.out(tok)


class ToyAutocastDiT(ToyDiT):
    """ToyDiT whose time embedding runs under ``torch.autocast(enabled=False)`` (as Z-Image,
    ERNIE-Image and Ideogram do), so the graph holds autocast enter/exit nodes, with a
    per-block scale and a final modulation computed from the time embedding in graph order
    between and after the blocks."""

    def __init__(self, cin=5, c=24, depth=3):
        super().__init__(cin, c, depth)
        self.block_scale = nn.ModuleList([nn.Linear(c, c) for _ in range(depth)])
        self.final = nn.Linear(c, c)

    def forward(self, x, timestep):
        with torch.autocast(device_type="cpu", enabled=False):
            temb = self.t_mlp(sinusoid(timestep, self.c).float())
        h = self.embed(x)
        for block, scale in zip(self.blocks, self.block_scale):
            h = block(h, temb * torch.sigmoid(scale(temb)))   # computed inside the region's span
        shift = self.final(temb)                               # after the region, from temb only
        return self.out(h + shift[:, None])


class PosEmbBlock(Block):
    """Block that first adds a position embedding computed outside it (as Cosmos does)."""

    def forward(self, x, temb, pos):
        return super().forward(x + pos, temb)


class ToyPosEmbDiT(ToyDiT):
    def __init__(self, cin=5, c=24, depth=3):
        super().__init__(cin, c, depth)
        self.blocks = nn.ModuleList([PosEmbBlock(c) for _ in range(depth)])
        self.pos = nn.Parameter(torch.randn(7, c))

    def forward(self, x, timestep):
        temb = self.t_mlp(sinusoid(timestep, self.c))
        pos = self.pos * 0.1
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, temb, pos)
        return self.out(h)


class ToyFlowDiT(nn.Module):
    """Blocks only, class-conditioned: the block stack's input is the model input and its output
    is the model output (the skeleton is the identity). A reused step must therefore return
    exactly ``x_s + (out_p - x_p)`` (``p``: the branch's last computed step), which a test can
    compute from the loop's own inputs and outputs. Tokens (B, N, C); ``y``: labels in [0, classes)."""

    def __init__(self, c=12, depth=4, classes=4):
        super().__init__()
        self.t_mlp = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.label = nn.Embedding(classes, c)
        self.blocks = nn.ModuleList([Block(c) for _ in range(depth)])
        self.c = c

    def forward(self, x, timestep, y):
        temb = self.t_mlp(sinusoid(timestep, self.c)) + self.label(y)
        for block in self.blocks:
            x = block(x, temb)
        return x


class ToyScatteredVideo(ToyJointVideo):
    """MiniMax-H3-style packed sequence: the video tokens ``(B, F*H*W, cin)`` (frame-major) and
    learned text tokens are scattered into one sequence with ``index_copy`` at the positions
    ``video_indices`` / ``text_indices`` (graph inputs), the blocks run over the sequence, and the
    video rows are selected back. ``use_cat``: the text and video tokens are joined with ``cat``
    instead (text first), the same model when the indices are contiguous. The blocks have no
    position encoding, so the outputs do not depend on where the tokens sit."""

    def __init__(self, use_cat=False, **kwargs):
        super().__init__(**kwargs)   # ToyJointVideo's embedding, text tokens, blocks and head
        self.use_cat = use_cat

    def forward(self, tokens, timestep, video_indices, text_indices):
        b, n, _ = tokens.shape
        vid, text = self.embed(tokens), self.text.expand(b, -1, -1)
        if self.use_cat:
            seq = torch.cat([text, vid], dim=1)
        else:
            seq = vid.new_zeros(b, n + self.text_len, self.c)
            seq = seq.index_copy(1, text_indices, text).index_copy(1, video_indices, vid)
        temb = self.t(sinusoid(timestep, self.c))
        for blk in self.blocks:
            seq = blk(seq, temb)
        seq = seq[:, self.text_len:] if self.use_cat else seq.index_select(1, video_indices)
        return self.out(seq)

"""``passes/analysis/find_branch_cores.py``: each residual branch's expensive core, found from the
graph by op kind: the output the branch's heavy work ends in, the gate and the timestep's
modulation left outside it (they would run fresh on a reused step at branch granularity)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from adacache_fx import explain
from adacache_fx.passes.analysis.find_branch_cores import find_branch_cores
from models.toy_models import ToyDiT, seeded


class _GatedBlock(nn.Module):
    """Wan's pattern: shift / scale / gate from the timestep, gated residual adds."""

    def __init__(self, c):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 6, c) / c ** 0.5)
        self.norm1, self.norm2 = nn.LayerNorm(c, elementwise_affine=False), nn.LayerNorm(c, elementwise_affine=False)
        self.qkv, self.out = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.ff1, self.ff2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x, temb):
        shift, scale, gate, c_shift, c_scale, c_gate = (self.table + temb[:, None]).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = self.out(F.scaled_dot_product_attention(q, k, v))
        x = (x.float() + attn * gate).type_as(x)
        h = self.norm2(x) * (1 + c_scale) + c_shift
        ff = self.ff2(F.gelu(self.ff1(h)))
        return x + ff.float() * c_gate


class _GatedDiT(nn.Module):
    def __init__(self, c=16, depth=3):
        super().__init__()
        self.embed, self.t_proj = nn.Linear(5, c), nn.Linear(1, c)
        self.blocks = nn.ModuleList(_GatedBlock(c) for _ in range(depth))
        self.head = nn.Linear(c, 5)

    def forward(self, x, timestep):
        temb = self.t_proj(timestep[:, None] / 1000)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h)


def _cores(model, *args, **kwargs):
    return find_branch_cores(explain(model, *args, **kwargs).regions)


def test_every_branch_core_ends_in_its_last_linear():
    cores = _cores(seeded(ToyDiT(depth=3), 0).eval(), torch.randn(2, 9, 5), torch.full((2,), 500.0))
    assert [c.block for c in cores] == ["blocks.0", "blocks.0", "blocks.1", "blocks.1", "blocks.2", "blocks.2"]
    assert all(c.output.target is torch._C._nn.linear for c in cores)
    attention, mlp = cores[0], cores[1]
    assert any(n.target is F.scaled_dot_product_attention for n in attention.nodes)
    assert not any(n.target is F.scaled_dot_product_attention for n in mlp.nodes)
    assert attention.bytes == 2 * 9 * 24 * 4   # one float32 output (B, N, C)


def test_the_gate_and_the_shared_modulation_stay_outside_the_core():
    torch.manual_seed(0)
    cores = _cores(_GatedDiT().eval(), torch.randn(2, 7, 5), torch.full((2,), 500.0))
    assert len(cores) == 6 and all(c.output.target is torch._C._nn.linear for c in cores)
    for core in cores:
        # the modulation (a chunk into six) also feeds the gate: it stays outside, run fresh
        modulation = [n for n in core.output.graph.nodes if n.target == "chunk" and len(n.users) == 6]
        assert modulation and not any(m in core.nodes for m in modulation)
        # closed: only the output leaves the core; the add and the gate's multiply are outside
        assert all(u in core.nodes for n in core.nodes if n is not core.output for u in n.users)
        assert core.add not in core.nodes and all(u not in core.nodes for u in core.output.users)


def test_the_reference_models_cores_are_its_attentions_and_feed_forward():
    from examples.reference import load_reference_model
    transformer, tokenizer = load_reference_model()
    latent = torch.randn(1, transformer.config.in_channels, 3, 16, 16)
    cores = _cores(transformer, hidden_states=latent, timestep=torch.tensor([500.0]),
                   encoder_hidden_states=tokenizer(["red circle moving left"]), return_dict=False)
    per_block = {}
    for core in cores:
        per_block.setdefault(core.block, []).append(core)
    assert len(per_block) == len(transformer.blocks) and all(len(c) == 3 for c in per_block.values())
    assert all(c.output.target is torch._C._nn.linear for c in cores)   # attn1's, attn2's to_out; ffn's last


def test_explain_states_the_cache_each_granularity_would_take():
    from adacache_fx import AdaCacheConfig
    model, args = seeded(ToyDiT(depth=3), 0).eval(), (torch.randn(2, 9, 5), torch.full((2,), 500.0))
    one = 2 * 9 * 24 * 4   # a float32 (B, N, C) tensor
    for reuse, copies in (("constant", 1), ("linear", 2)):   # the linear forecast keeps the previous delta too
        ex = explain(model, *args, config=AdaCacheConfig(reuse=reuse))
        assert ex.cache_bytes() == {"stack": copies * one, "branch": copies * 6 * one}
    assert "caching each of the 6 residual branches' cores" in str(ex)

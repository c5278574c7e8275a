"""Same-shaped blocks that are not pure residual streams: post-norm blocks and masked updates.

The region's stream is then a *boundary* stream (its output has the shape of one region input it
depends on): the cache keeps ``out - in``, the reuse path returns ``in + delta``, and the probe is
the middle block's own output delta. Checked: caching off is bit-identical to plain
torch.compile; ``{inf: 3}`` over 12 steps computes 1, 2, 5, 8, 11, 12 and the blocks run only
then; on every reused step the output equals an independently computed
``head(stack_input + cached delta)``; no recompile inside a generation."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adacache_fx import AdaCacheConfig, adacache_backend, explain
from helpers import INF, count_ops, no_recompiles, timesteps
from models.toy_models import seeded, sinusoid

CONTRACT_12 = [1, 2, 5, 8, 11, 12]


class PostNormBlock(nn.Module):
    """``x = norm1(x + attn(x)); x = norm2(x + mlp(x))`` (the original Transformer's order)."""

    def __init__(self, c):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x, temb):
        q, k, v = self.qkv(x * (1 + temb[:, None])).chunk(3, dim=-1)
        x = self.norm1(x + self.proj(F.scaled_dot_product_attention(q, k, v)))
        return self.norm2(x + self.mlp(x))


class MaskedGatedBlock(nn.Module):
    """``x = where(mask, x + gate * f(norm(x)), x)``: gated updates applied only to the tokens a
    per-token mask selects (Open-Sora-style masked frames)."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.ada = nn.Linear(c, 2 * c)

    def forward(self, x, temb, mask):
        gate_attn, gate_mlp = self.ada(temb)[:, None].chunk(2, dim=-1)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = torch.where(mask[..., None], x + gate_attn * self.proj(F.scaled_dot_product_attention(q, k, v)), x)
        return torch.where(mask[..., None], x + gate_mlp * self.mlp(self.norm2(x)), x)


class StackDiT(nn.Module):
    """stem -> blocks -> head, split into methods so a test can compute the reuse path by hand."""

    def __init__(self, block_cls, cin=5, c=24, depth=4, masked=False):
        super().__init__()
        self.embed = nn.Linear(cin, c)
        self.t_mlp = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList([block_cls(c) for _ in range(depth)])
        self.out = nn.Linear(c, cin)
        self.c, self.masked = c, masked

    def stem(self, x, timestep):
        return self.embed(x), self.t_mlp(sinusoid(timestep, self.c))

    def stack(self, h, temb, *extra):
        for block in self.blocks:
            h = block(h, temb, *extra)
        return h

    def head(self, h, temb):
        return self.out(h) * (1 + temb.mean(-1))[:, None, None]

    def forward(self, x, timestep, *extra):
        h, temb = self.stem(x, timestep)
        return self.head(self.stack(h, temb, *extra), temb)


def _mask(batch=2, tokens=9):
    m = torch.ones(batch, tokens, dtype=torch.bool)
    m[0, -3:] = False          # padded tokens of sample 0 are never updated
    m[1, 2] = False
    return m


CASES = {
    "post_norm": (lambda: seeded(StackDiT(PostNormBlock).eval()), ()),
    "masked_gated": (lambda: seeded(StackDiT(MaskedGatedBlock, masked=True).eval()), (_mask(),)),
}


def _euler(model, steps, x0, extra, record=None):
    """Flow-Euler-like loop: the input changes every step with the output."""
    x, outs = x0.clone(), []
    grid = list(steps) + [0.0]
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:]):
            v = model(x, torch.full((x.shape[0],), float(t)), *extra)
            if record is not None:
                record.append((x.clone(), float(t)))
            outs.append(v)
            x = x + (t_next - t) / 1000.0 * v
    return outs


def _x0():
    return torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", sorted(CASES))
def test_explain_finds_a_boundary_stream_and_a_block_delta_probe(name):
    build, extra = CASES[name]
    e = explain(build(), _x0(), torch.full((2,), 500.0), *extra)
    (graph,) = e.graphs
    assert [r.block_paths for r in graph.regions] == [[f"blocks.{i}" for i in range(4)]]
    (stream,) = graph.regions[0].streams
    assert stream.kind == "boundary"
    assert graph.probe.rule == "block delta" and graph.probe.block == "blocks.2"
    text = str(e)
    assert "(boundary)" in text and "probe (block delta)" in text


@pytest.mark.parametrize("name", sorted(CASES))
def test_caching_off_is_bit_identical(name):
    build, extra = CASES[name]
    model = build()
    plain = _euler(torch.compile(model, backend="eager"), timesteps(6), _x0(), extra)
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig.no_cache(num_steps=6), inner="eager")
    ours = _euler(torch.compile(model, backend=backend), timesteps(6), _x0(), extra)
    assert not backend.uncached_graphs and backend.graphs[0].runners
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_schedule_reuses_input_plus_delta(name):
    build, extra = CASES[name]
    model = build()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="constant"), inner="eager")
    compiled = torch.compile(model, backend=backend)
    _euler(compiled, timesteps(12), _x0() + 1.0, extra)   # compile first (tracing runs attention on fakes)
    backend.reset()
    inputs: list = []
    with no_recompiles():
        sdpa = count_ops(lambda: outs.extend(_euler(compiled, timesteps(12), _x0(), extra, record=inputs)))
    assert backend.report().computed_steps == CONTRACT_12
    assert sdpa == len(CONTRACT_12) * 4                     # attention ran in the 4 blocks on computed steps only
    assert backend.report().block_executions == 2 * len(CONTRACT_12)   # both generations
    last_delta = None
    with torch.no_grad():
        for step, ((x, t), out) in enumerate(zip(inputs, outs), start=1):
            h, temb = model.stem(x, torch.full((2,), t))
            if step in CONTRACT_12:
                last_delta = model.stack(h, temb, *extra) - h
                expected = model.head(h + last_delta, temb)
                torch.testing.assert_close(out, model(x, torch.full((2,), t), *extra), rtol=1e-5, atol=1e-5)
            else:
                expected = model.head(h + last_delta, temb)   # skeleton(input) + cached delta
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and the reuse differs from the uncached model (the blocks really were skipped)
    uncached = _euler(model, timesteps(12), _x0(), extra)
    assert max((a - b).abs().max().item() for a, b in zip(outs, uncached)) > 1e-4


outs: list = []


@pytest.fixture(autouse=True)
def _clear_outs():
    outs.clear()
    yield
    outs.clear()


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_double_then_single_stream_stacks_cache_whole(name):
    """Flux-style stacks (double-stream blocks, a concat of text and image tokens, single-stream
    blocks, a split) are one region: the image tokens are a boundary stream across the concat and
    split, so a reused step skips every block (before: only the double-stream list, 47-49% of the
    forward's FLOPs)."""
    from zoo import get_case
    case = get_case(name)
    model = case.build()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for t in timesteps(12, case.t_max):
            args, kwargs = case.make_inputs(2, t)
            case.output(compiled(*args, **kwargs))
    report = backend.report()
    (region,) = report.regions
    assert any("single" in b for b in region.blocks) and any("single" not in b for b in region.blocks)
    assert report.computed_steps == CONTRACT_12
    assert report.cached_flops_fraction > 0.85, report.cached_flops_fraction


# ----- blocks that are not children of a ModuleList of two or more ------------------------
from models.toy_models import Block  # noqa: E402


class _Stem(nn.Module):
    def __init__(self, c=24):
        super().__init__()
        self.embed = nn.Linear(5, c)
        self.t_mlp = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))   # two linears: no block
        self.out = nn.Linear(c, 5)
        self.c = c

    def run(self, x, timestep, blocks):
        temb = self.t_mlp(sinusoid(timestep, self.c))
        h = self.embed(x)
        for block in blocks:
            h = block(h, temb)
        return self.out(h)


class NamedBlocks(_Stem):
    def __init__(self):
        super().__init__()
        for i in range(4):
            setattr(self, f"block_{i}", Block(self.c))

    def forward(self, x, timestep):
        return self.run(x, timestep, [getattr(self, f"block_{i}") for i in range(4)])


class LoopedSharedBlock(_Stem):
    """One block applied four times (weight sharing / looped transformers): each call is a block."""

    def __init__(self):
        super().__init__()
        self.block = Block(self.c)

    def forward(self, x, timestep):
        return self.run(x, timestep, [self.block] * 4)


class DictBlocks(_Stem):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleDict({name: Block(self.c) for name in ("early", "mid", "late", "last")})

    def forward(self, x, timestep):
        return self.run(x, timestep, list(self.stages.values()))


class SequentialBlocks(_Stem):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(*[Block(self.c) for _ in range(4)])

    def forward(self, x, timestep):
        return self.run(x, timestep, list(self.stages))


CALL_CASES = {
    NamedBlocks: ["block_0", "block_1", "block_2", "block_3"],
    LoopedSharedBlock: ["block", "block@1", "block@2", "block@3"],
    DictBlocks: ["stages.early", "stages.mid", "stages.late", "stages.last"],
    SequentialBlocks: ["stages.0", "stages.1", "stages.2", "stages.3"],
}


@pytest.mark.parametrize("cls", list(CALL_CASES), ids=lambda c: c.__name__)
def test_blocks_outside_module_lists_cache_with_the_contract(cls):
    model = seeded(cls().eval())
    x0 = _x0()
    e = explain(model, x0, torch.full((2,), 500.0))
    assert [r.block_paths for r in e.graphs[0].regions] == [CALL_CASES[cls]]
    assert e.graphs[0].probe.rule == "residual branch" and e.graphs[0].probe.block == CALL_CASES[cls][2]
    torch._dynamo.reset()
    plain = _euler(torch.compile(model, backend="eager"), timesteps(12), x0, ())
    torch._dynamo.reset()
    off = adacache_backend(AdaCacheConfig.no_cache(num_steps=12), inner="eager")
    for a, b in zip(_euler(torch.compile(model, backend=off), timesteps(12), x0, ()), plain):
        assert torch.equal(a, b)
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(model, backend=backend)
    _euler(compiled, timesteps(12), x0 + 1.0, ())       # compile outside the count
    backend.reset()
    with no_recompiles():
        sdpa = count_ops(lambda: _euler(compiled, timesteps(12), x0, ()))
    assert backend.report().computed_steps == CONTRACT_12
    assert sdpa == len(CONTRACT_12) * 4


class ControlBlock(Block):
    """A block on control tokens that also emits a hint for the main blocks (Wan-VACE style)."""

    def __init__(self, c):
        super().__init__(c)
        self.hint = nn.Linear(c, c)

    def forward(self, x, temb):
        x = super().forward(x, temb)
        return x, self.hint(x)


class ControlHints(_Stem):
    """Control blocks first (their hints are not streams: nothing of their shape goes in), then the
    main blocks, each followed by ``h = h + 0.5 * hint``: the control blocks' outputs are used only
    between the main blocks."""

    def __init__(self):
        super().__init__()
        self.control_embed = nn.Linear(5, self.c)
        self.control_blocks = nn.ModuleList([ControlBlock(self.c) for _ in range(2)])
        self.blocks = nn.ModuleList([Block(self.c) for _ in range(2)])

    def forward(self, x, timestep, control):
        temb = self.t_mlp(sinusoid(timestep, self.c))
        h = self.embed(x)
        c, hints = self.control_embed(control) + h, []
        for block in self.control_blocks:
            c, hint = block(c, temb)
            hints.append(hint)
        for block, hint in zip(self.blocks, hints):
            h = block(h, temb) + 0.5 * hint
        return self.out(h)


def test_control_blocks_whose_hints_feed_the_main_blocks_join_their_region():
    """The control blocks join the main blocks' region (before: left uncached, 50% of the blocks'
    FLOPs on every step): caching off is exact, ``{inf: 3}`` follows the contract and a reused step
    runs no block, control blocks included."""
    model = seeded(ControlHints().eval())
    x0, control = _x0(), torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(4))
    e = explain(model, x0, torch.full((2,), 500.0), control)
    assert [r.block_paths for r in e.graphs[0].regions] == [
        ["control_blocks.0", "control_blocks.1", "blocks.0", "blocks.1"]]
    assert e.cached_block_flops_fraction == pytest.approx(1.0)
    torch._dynamo.reset()
    plain = _euler(torch.compile(model, backend="eager"), timesteps(12), x0, (control,))
    torch._dynamo.reset()
    off = adacache_backend(AdaCacheConfig.no_cache(num_steps=12), inner="eager")
    for a, b in zip(_euler(torch.compile(model, backend=off), timesteps(12), x0, (control,)), plain):
        assert torch.equal(a, b)
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(model, backend=backend)
    _euler(compiled, timesteps(12), x0 + 1.0, (control,))       # compile outside the count
    backend.reset()
    with no_recompiles():
        sdpa = count_ops(lambda: _euler(compiled, timesteps(12), x0, (control,)))
    assert backend.report().computed_steps == CONTRACT_12
    assert sdpa == len(CONTRACT_12) * 4


def test_flux_with_one_block_per_list_caches_both():
    """FluxTransformer2DModel with num_layers=1, num_single_layers=1: each list holds one block."""
    diffusers = pytest.importorskip("diffusers")
    from zoo import _finish, get_case
    case = get_case("flux")
    model = _finish(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)), seed=0)
    args, kwargs = case.make_inputs(2, 0.5)
    e = explain(model, *args, **kwargs)
    assert [r.block_paths for r in e.regions] == [["transformer_blocks.0", "single_transformer_blocks.0"]]
    assert e.cached_flops_fraction > 0.85 and "of the blocks' FLOPs" in str(e)
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for t in timesteps(12, 1.0):
            a, k = case.make_inputs(2, t)
            case.output(compiled(*a, **k))
    report = backend.report()
    assert report.computed_steps == CONTRACT_12 and report.cached_flops_fraction > 0.85
    assert abs(report.cached_flops_fraction - e.cached_flops_fraction) < 1e-9   # explain and report agree


@pytest.mark.parametrize("name", sorted(CASES))
def test_without_module_metadata_the_residual_chain_finds_the_stack(name):
    """A graph with no ``nn_module_stack`` (as ``symbolic_trace`` output may be): the structural
    fallback follows the trunk through post-norms and masked selects, finds the 4 blocks' 8
    residual adds as one region, and the backend caches that graph with the contract."""
    from adacache_fx.passes.analysis import analyze
    from adacache_fx.passes.analysis.graph_nodes import user_placeholder_name
    build, extra = CASES[name]
    model = build()
    captured = []
    torch.compile(model, backend=lambda gm, ex: captured.append((gm, list(ex))) or gm.forward)(
        _x0(), torch.full((2,), 500.0), *extra)
    gm, inputs = captured[0]
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    a = analyze(gm.graph, AdaCacheConfig())
    (region,) = a.regions
    assert [b.path for b in region.blocks] == [f"residual_chain.{k}" for k in range(8)]
    assert region.streams[0].kind == "boundary" and a.probe is not None
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    fn = backend(gm, inputs)
    assert backend.graphs and not backend.uncached_graphs
    names = [user_placeholder_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
    x = _x0()
    with torch.no_grad():
        for step, t in enumerate(timesteps(12), start=1):
            inputs[names.index("x")], inputs[names.index("timestep")] = x, torch.full((2,), float(t))
            out = fn(*inputs)[0]
            if step in CONTRACT_12:
                torch.testing.assert_close(out, gm(*inputs)[0], rtol=1e-5, atol=1e-5)
            x = x - out / 12.0
    assert backend.report().computed_steps == CONTRACT_12

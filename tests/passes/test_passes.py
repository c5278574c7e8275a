"""Pass unit tests on small hand-written models' Dynamo graphs."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn


from adacache_fx import AdaCacheConfig, AdaCacheWarning  # noqa: E402
from adacache_fx.passes.analysis import analyze  # noqa: E402
from adacache_fx.passes.rewrite.add_cache_outputs import add_cache_outputs  # noqa: E402
from adacache_fx.passes.analysis.find_blocks import find_blocks  # noqa: E402
from adacache_fx.passes.analysis.graph_nodes import module_path  # noqa: E402
from adacache_fx.passes.analysis.frame_layout import infer_frame_layout  # noqa: E402
from helpers import (INF, BlockStackReference, assert_matches_reference, cached, euler_loop,  # noqa: E402
                     relative_l1, sample_loop, timesteps)
from models.toy_models import (Block, ToyAutocastDiT, ToyDiT, ToyPosEmbDiT, ToyDualStream, ToyJointVideo, ToyLatte, ToyShardedTokens, ToySkipDiT, seeded,  # noqa: E402
                        sinusoid)


def graph_of(model, *args):
    """The Dynamo graph of ``model(*args)`` (one graph expected)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def analysis_of(model, *args, **config):
    gm = graph_of(model, *args)
    return analyze(gm.graph, AdaCacheConfig(**config)), gm


@pytest.mark.parametrize("raw, path", [
    ("L['self'].blocks[3].attn", "blocks.3.attn"),
    ("L['self'].blocks.3", "blocks.3"),
    ("L['self'].__dict__['_modules']['transformer_blocks'].0.norm1", "transformer_blocks.0.norm1"),
    ("L['s'].te", "te"),
])
def test_module_path(raw, path):
    assert module_path(raw) == path


def test_blocks_are_repeated_children_and_mixed_lists_are_not():
    model = seeded(ToyDiT(depth=3))
    gm = graph_of(model, torch.randn(2, 7, 5), torch.full((2,), 3.0))
    blocks = find_blocks(gm.graph)
    assert [b.path for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(b.cls_name == "Block" for b in blocks)
    # nn.Sequential children of mixed classes (mlp.0 Linear, mlp.1 GELU) are not blocks
    assert not any("mlp" in b.path for b in blocks)


def test_single_stream_region_and_probe():
    a, _ = analysis_of(seeded(ToyDiT(depth=5)), torch.randn(2, 7, 5), torch.full((2,), 3.0))
    (region,) = a.regions
    assert region.block_paths == [f"blocks.{i}" for i in range(5)]
    (stream,) = region.streams
    assert len(stream.adds) == 10
    assert a.probe.block == "blocks.2" and a.probe.branch_index == 0
    assert a.timestep is not None and a.timestep.target.lower().startswith("l_timestep")
    assert a.frame_layout is None


def test_probe_override_by_index_path_and_branch():
    args = (torch.randn(2, 7, 5), torch.full((2,), 3.0))
    a, _ = analysis_of(seeded(ToyDiT(depth=5)), *args, probe_block=-1, probe_branch=1)
    assert a.probe.block == "blocks.4" and a.probe.branch_index == 1
    a, _ = analysis_of(seeded(ToyDiT(depth=5)), *args, probe_block="blocks.1")
    assert a.probe.block == "blocks.1"
    with pytest.raises(ValueError, match="probe_block"):
        analysis_of(seeded(ToyDiT(depth=5)), *args, probe_block="nope.7")
    with pytest.raises(ValueError, match="probe_branch"):
        analysis_of(seeded(ToyDiT(depth=5)), *args, probe_branch=5)


def test_latte_layout_glue_between_two_block_lists():
    a, _ = analysis_of(seeded(ToyLatte(depth=2, frames=3)), torch.randn(2, 3, 3, 4, 5), torch.full((2,), 3.0))
    (region,) = a.regions
    assert region.block_paths == ["spatial.0", "temporal.0", "spatial.1", "temporal.1"]
    (stream,) = region.streams
    # the region ends in the temporal layout (B*S, F, C); its input is (B*F, S, C)
    assert tuple(stream.shape) == (2 * 20, 3, 16)
    assert tuple(stream.input.meta["example_value"].shape) == (2 * 3, 20, 16)
    # the temporal position embedding add sits on the trunk between blocks
    assert any(add.block is None for add in stream.adds)
    assert a.frame_layout is not None and a.frame_layout.video_frame_dim == 2


def test_dual_stream_then_concat_gives_two_regions():
    model = seeded(ToyDualStream())
    a, _ = analysis_of(model, torch.randn(2, 6, 4), torch.randn(2, 5, 6), torch.full((2,), 3.0))
    assert [r.block_paths for r in a.regions] == [["double_blocks.0", "double_blocks.1"],
                                                  ["single_blocks.0", "single_blocks.1"]]
    assert len(a.regions[0].streams) == 2          # image and text tokens
    assert len(a.regions[1].streams) == 1
    assert a.probe.region == 0


def test_dual_stream_caching():
    model = seeded(ToyDualStream())
    img, txt = torch.randn(2, 6, 4), torch.randn(2, 5, 6)

    def make(batch, t):
        return (img, txt, torch.full((2,), t)), {}
    steps = timesteps(12)
    compiled, backend = cached(model, {INF: 1}, num_steps=12)
    for a, b in zip(euler_loop(compiled, make, steps).outputs(), euler_loop(model, make, steps).outputs()):
        torch.testing.assert_close(a, b)
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    run = euler_loop(compiled, make, steps)
    report = backend.report()
    assert report.computed_steps == [1, 2, 5, 8, 11, 12]
    assert len(report.regions) == 2 and len(report.regions[0].streams) == 2
    # two regions, three streams: computed steps are the plain model, reused ones near it (this
    # std-0.2 toy changes fast: measured 8-26% per reused step, 2.5% on the final latents)
    with torch.no_grad():
        for step, (call,) in enumerate(run.calls, start=1):
            error = relative_l1(call.output, model(*call.args))
            assert (error < 1e-5) if step in report.computed_steps else (1e-5 < error < 0.5), (step, error)
    assert relative_l1(run.final, euler_loop(model, make, steps).final) < 0.1


def test_long_skips_split_the_stack_into_closed_regions():
    model = seeded(ToySkipDiT())
    a, _ = analysis_of(model, torch.randn(2, 7, 5), torch.full((2,), 3.0))
    regions = [r.block_paths for r in a.regions]
    # blocks 1-3 are a closed function of h0 (the skip re-enters inside them): one region whose
    # output h3 is a boundary stream of h0; block 0's output leaves for the skip and the head
    assert regions == [["blocks.0"], ["blocks.1", "blocks.2", "blocks.3"]]
    assert [[s.kind for s in r.streams] for r in a.regions] == [["residual"], ["boundary"]]
    x = torch.randn(2, 7, 5)

    def make(batch, t):
        return (x, torch.full((2,), t)), {}
    compiled, _ = cached(model, {INF: 1}, num_steps=6)
    plain = euler_loop(model, make, timesteps(6)).outputs()
    for a_, b_ in zip(euler_loop(compiled, make, timesteps(6)).outputs(), plain):
        torch.testing.assert_close(a_, b_)


class _NamedSigma(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(8) for _ in range(2)])
        self.emb = nn.Linear(8, 8)

    def forward(self, x, sigma, scale):
        temb = self.emb(sinusoid(sigma, 8)) * scale[:, None]
        for b in self.blocks:
            x = b(x, temb)
        return x


def test_timestep_found_by_sinusoid_not_by_name():
    model = seeded(_NamedSigma())
    a, _ = analysis_of(model, torch.randn(2, 3, 8), torch.full((2,), 0.5), torch.ones(2))
    assert "sigma" in a.timestep.target
    a, _ = analysis_of(model, torch.randn(2, 3, 8), torch.full((2,), 0.5), torch.ones(2), timestep_arg="scale")
    assert "scale" in a.timestep.target
    with pytest.raises(ValueError, match="timestep_arg"):
        analysis_of(model, torch.randn(2, 3, 8), torch.full((2,), 0.5), torch.ones(2), timestep_arg="nope")


class _FramesSecond(nn.Module):
    """Video input laid out (B, F, C, H, W), as CogVideoX takes it; tokens (B, F*S, C)."""

    def __init__(self, c=8):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 1)
        self.blocks = nn.ModuleList([Block(c) for _ in range(2)])
        self.t = nn.Linear(c, c)
        self.c = c

    def forward(self, x, timestep):
        b, f, cin, h, w = x.shape
        tok = self.patch(x.reshape(b * f, cin, h, w)).flatten(2).transpose(1, 2)   # (B*F, S, C)
        tok = tok.reshape(b, f * h * w, self.c)
        temb = self.t(sinusoid(timestep, self.c))
        for blk in self.blocks:
            tok = blk(tok, temb)
        return tok


def test_frame_layout_for_frames_second_inputs():
    model = seeded(_FramesSecond())
    a, _ = analysis_of(model, torch.randn(2, 5, 3, 2, 3), torch.full((2,), 3.0))
    layout = a.frame_layout
    assert layout.video_frame_dim == 1
    assert (layout.probe_axis.dim, int(layout.probe_axis.inner), int(layout.probe_axis.frames)) == (1, 6, 5)


def test_frame_layout_matches_a_hand_computed_view():
    """The probe viewed as (-1, F, N) groups elements by their true frame."""
    model = seeded(ToyLatte(depth=2, frames=3))
    a, gm = analysis_of(model, torch.randn(2, 3, 3, 4, 5), torch.full((2,), 3.0))
    axis = a.frame_layout.probe_axis
    # the probe of the spatial block lives in (B*F, S, C): frame = row % F
    assert (axis.dim, int(axis.inner), int(axis.frames)) == (0, 1, 3)


@pytest.mark.parametrize("text_first", [True, False], ids=["cat-text-video", "cat-video-text"])
def test_frame_layout_through_a_cat_with_text_tokens(text_first):
    """Blocks over cat([text, video]) (or [video, text]): the probe's frames are the video
    tokens at an offset; F=3 frames of 2x5 patches, 5 text tokens."""
    model = seeded(ToyJointVideo(text_first=text_first))
    a, _ = analysis_of(model, torch.randn(2, 3, 3, 2, 5), torch.full((2,), 3.0))
    axis = a.frame_layout.probe_axis
    assert (axis.dim, int(axis.inner), int(axis.frames)) == (1, 10, 3)
    assert (int(axis.offset), int(axis.span)) == ((5, 30) if text_first else (0, 30))
    assert "video tokens" in a.frame_layout.describe()


@pytest.mark.parametrize("text_first", [True, False])
def test_frame_layout_through_a_split_back_to_the_video_tokens(text_first):
    model = seeded(ToyJointVideo(text_first=text_first, split_before_blocks=True))
    a, _ = analysis_of(model, torch.randn(2, 3, 3, 2, 5), torch.full((2,), 3.0))
    axis = a.frame_layout.probe_axis
    assert (axis.dim, int(axis.inner), int(axis.frames), axis.segmented) == (1, 10, 3, False)


def test_segmented_probe_view_measures_the_video_tokens_only():
    """At run time the probe is narrowed to the video tokens before the (-1, F, inner) view:
    changing the text tokens' residual does not change the motion score."""
    from adacache_fx.ops import fused_cache_metrics

    model = seeded(ToyJointVideo(text_first=True))
    compiled, backend = cached(model, {INF: 1}, num_steps=4)
    sample_loop(compiled, lambda b, t: ((torch.randn(b, 3, 3, 2, 5, generator=torch.Generator().manual_seed(0)),
                                         torch.full((b,), t)), {}), timesteps(4))
    graph = backend.graphs[0]
    assert graph.frame_axis.segmented
    probe = torch.randn(2, 35, 16)
    args = [None] * 8
    view = graph._probe_view(probe, args)[0]
    torch.testing.assert_close(view, probe[:, 5:].reshape(-1, 3, 10 * 16))
    other = probe.clone()
    other[:, :5] += 100.0   # the text tokens
    torch.testing.assert_close(fused_cache_metrics(graph._probe_view(other, args)[0], view, 1),
                               fused_cache_metrics(view, view, 1))
    assert all(m.motion is not None for m in backend.report().metrics)


@pytest.mark.parametrize("slice_", [False, True], ids=["chunk", "slice"])
@pytest.mark.parametrize("shards, index, frames", [(2, 1, 4), (2, 0, 2), (3, 2, 6)])
def test_frame_layout_of_a_shard_of_whole_frames(shards, index, frames, slice_):
    """Piece ``index`` of ``shards`` equal pieces of the frame tokens (a context-parallel split):
    the probe's axis counts this piece's frames and says which shard it is. In one process there
    is no group to exchange the boundary frames with, so MoReg is off, and a warning says why."""
    model = seeded(ToyShardedTokens(shards=shards, index=index, slice_=slice_))
    with pytest.warns(AdaCacheWarning, match="no process group"):
        a, _ = analysis_of(model, torch.randn(2, 3, frames, 2, 5), torch.full((2,), 3.0))
    assert a.frame_layout is None and any(m.startswith("MoReg off:") and "shard" in m for m in a.log)
    layout = infer_frame_layout(a.graph, a.probe.node)
    axis = layout.probe_axis
    assert (axis.dim, int(axis.inner), int(axis.frames), axis.shard[:2]) == (1, 10, frames // shards, (index, shards))
    assert f"shard {index} of {shards}" in layout.describe()


def test_frame_layout_of_a_shard_of_part_of_a_frame_is_lost_and_said():
    """3 frames in 2 pieces: a piece holds 1.5 frames, the frame pairs are not rank-local plus a
    boundary: MoReg off, and the message names the split."""
    model = seeded(ToyShardedTokens(shards=2, index=0))
    with pytest.warns(AdaCacheWarning, match="whole frames"):
        a, _ = analysis_of(model, torch.randn(2, 3, 3, 2, 5), torch.full((2,), 3.0))
    assert a.frame_layout is None
    assert any(m.startswith("MoReg off:") and "chunk" in m and "whole frames" in m for m in a.log)


class _TableBlock(Block):
    """A block whose attention inputs get a per-token table (as rotary embeddings enter q and k)."""

    def forward(self, x, temb, table):
        h = self.norm1(x) * (1 + temb[:, None])
        q, k, v = self.qkv(h + table).chunk(3, dim=-1)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(self.norm2(x))


class _PackedWithTable(nn.Module):
    """Packed video tokens (B, F*S, C) and a per-token table (B, F*S, 2C) with more elements (a
    rotary table): the table reaches the probe too, but the stream comes from the tokens."""

    def __init__(self, c=16):
        super().__init__()
        self.embed, self.table = nn.Linear(3, c), nn.Linear(2 * c, c)
        self.t = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList([_TableBlock(c) for _ in range(2)])
        self.out, self.c = nn.Linear(c, 3), c

    def forward(self, tokens, table, timestep, num_frames):
        temb = self.t(sinusoid(timestep, self.c))
        h, bias = self.embed(tokens) * (num_frames / 3), self.table(table)
        for blk in self.blocks:
            h = blk(h, temb, bias)
        return self.out(h)


def test_packed_layout_prefers_the_tokens_the_streams_come_from():
    from adacache_fx import explain
    model = seeded(_PackedWithTable())
    e = explain(model, torch.randn(2, 30, 3), torch.randn(2, 30, 32), torch.full((2,), 3.0), 3,
                config=AdaCacheConfig(frames_arg="num_frames"))
    layout = e.frame_layout
    assert layout.packed and layout.video_input == "tokens" and int(layout.probe_axis.frames) == 3


def test_frame_layout_override_and_image_model():
    a, gm = analysis_of(seeded(ToyLatte()), torch.randn(2, 3, 3, 4, 5), torch.full((2,), 3.0), video_frame_dim=2)
    assert a.frame_layout.video_frame_dim == 2
    a, _ = analysis_of(seeded(ToyDiT()), torch.randn(2, 7, 5), torch.full((2,), 3.0))
    reasons = []
    assert infer_frame_layout(a.graph, a.probe.node, None, reasons) is None
    assert [r.kind for r in reasons] == ["MoReg off"] and "image model" in reasons[0].message


def test_add_cache_outputs_refuses_to_run_twice():
    a, gm = analysis_of(seeded(ToyDiT()), torch.randn(2, 7, 5), torch.full((2,), 3.0))
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    work = analyze(graph, AdaCacheConfig())
    add_cache_outputs(graph, work.regions, work.probe)
    with pytest.raises(RuntimeError, match="already applied"):
        add_cache_outputs(graph, work.regions, work.probe)


def test_symbolic_trace_graph_keeps_module_metadata():
    gm = fx.symbolic_trace(seeded(ToyDiT(depth=3)))
    assert [b.path for b in find_blocks(gm.graph)] == ["blocks.0", "blocks.1", "blocks.2"]


class _AttributeBlocks(nn.Module):
    """Blocks held as plain attributes, not in a ModuleList."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Block(8), Block(8)
        self.emb = nn.Linear(8, 8)

    def forward(self, x, timestep):
        temb = self.emb(sinusoid(timestep, 8))
        return self.second(self.first(x, temb), temb)


def test_blocks_outside_module_lists_found_from_the_residual_chain():
    model = seeded(_AttributeBlocks())
    x = torch.randn(2, 3, 8)
    gm = graph_of(model, x, torch.full((2,), 1.0))
    # with module metadata, the two attribute blocks are found as sibling calls of one class
    assert [b.path for b in find_blocks(gm.graph)] == ["first", "second"]
    # without it (a graph whose nn_module_stack is gone), the residual chain finds the stack
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    assert find_blocks(gm.graph) == []
    a = analyze(gm.graph, AdaCacheConfig())
    (region,) = a.regions
    assert [b.path for b in region.blocks] == [f"residual_chain.{k}" for k in range(4)]
    assert a.probe.block == "residual_chain.2"

    def make(batch, t):
        return (x, torch.full((2,), t)), {}
    compiled, backend = cached(model, {INF: 1}, num_steps=6)
    plain = euler_loop(model, make, timesteps(6)).outputs()
    for a_, b_ in zip(euler_loop(compiled, make, timesteps(6)).outputs(), plain):
        torch.testing.assert_close(a_, b_)
    compiled, backend = cached(model, {INF: 3}, num_steps=6)
    run = euler_loop(compiled, make, timesteps(6))
    assert backend.report().computed_steps == [1, 2, 5, 6]
    assert_matches_reference(run, BlockStackReference(model, ["first", "second"]).expected(run, [1, 2, 5, 6]))


def test_impure_writes_inside_blocks_do_not_keep_them_in_the_reuse_path():
    from models.toy_models import ToyRotaryDiT
    model = seeded(ToyRotaryDiT())
    x = torch.randn(2, 7, 5)

    def make(batch, t):
        return (x, torch.full((2,), t)), {}
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    run = euler_loop(compiled, make, timesteps(12))
    report = backend.report()
    assert not report.uncached_graphs
    assert report.computed_steps == [1, 2, 5, 8, 11, 12] and report.block_executions == 6
    reference = BlockStackReference(model, [f"blocks.{i}" for i in range(4)])
    assert_matches_reference(run, reference.expected(run, report.computed_steps))


def test_split_keeps_graph_order_under_autocast():
    """A graph with autocast enter/exit nodes needs pieces in graph order (split_module replays
    the autocast state per piece): timestep-only nodes inside the blocks' span join the region,
    those after it go to the piece after it; caching off is exact and the contract holds."""
    model = seeded(ToyAutocastDiT())
    make = lambda b, t: ((torch.randn(b, 7, 5, generator=torch.Generator().manual_seed(1)), torch.full((b,), t)), {})  # noqa: E731
    gm = graph_of(model, *make(2, 3.0)[0])
    assert any(n.target is torch.amp._enter_autocast for n in gm.graph.nodes)
    torch._dynamo.reset()
    plain = euler_loop(torch.compile(model, backend="eager"), make, timesteps(8))
    compiled, backend = cached(model, {INF: 1}, num_steps=8)
    ours = euler_loop(compiled, make, timesteps(8))
    assert all(torch.equal(a, b) for a, b in zip(plain.outputs(), ours.outputs()))
    assert not backend.uncached_graphs and backend.graphs[0].runners
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    run = euler_loop(compiled, make, timesteps(12))
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
    assert backend.report().block_executions == 6 * len(backend.graphs[0].runners)
    reference = BlockStackReference(model, [f"blocks.{i}" for i in range(3)])
    assert_matches_reference(run, reference.expected(run, backend.report().computed_steps))


def test_probe_skips_adds_of_values_computed_outside_the_blocks():
    """``x + pos`` inside every block, with ``pos`` computed before the blocks: not a residual
    branch of the block (the same tensor every step), so not the probe."""
    model = seeded(ToyPosEmbDiT())
    a, _ = analysis_of(model, torch.randn(2, 7, 5), torch.full((2,), 3.0))
    assert a.probe.node in a.regions[a.probe.region].nodes
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    x = torch.randn(2, 7, 5)
    run = euler_loop(compiled, lambda b, t: ((x, torch.full((b,), t)), {}), timesteps(12))
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12] and not backend.uncached_graphs
    reference = BlockStackReference(model, [f"blocks.{i}" for i in range(3)])
    assert_matches_reference(run, reference.expected(run, backend.report().computed_steps))


class _TwoOutputsOfOneInput(torch.nn.Module):
    """Blocks that return two tensors continuing one input: no region (two streams of one input)."""

    def __init__(self, c=8):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Forked(c) for _ in range(2)])
        self.t = torch.nn.Linear(c, c)

    def forward(self, x, timestep):
        temb = self.t(torch.sin(timestep[:, None] * torch.ones(1, x.shape[-1])))
        a = x
        for block in self.blocks:
            a, b = block(a, temb)
            a = a + b
        return a


class _Forked(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f, self.g = torch.nn.Linear(c, c), torch.nn.Linear(c, c)

    def forward(self, x, temb):
        return x + self.f(x * temb[:, None]), x - self.g(x)


def test_why_a_graph_runs_uncached_is_a_structured_reason():
    """The reason names the construct, its graph node and op, the model's source line and what to
    do; the warning is made from it, not from the log's text."""
    from adacache_fx.passes.analysis.reasons import BLOCK_LEFT_UNCACHED, NO_BLOCKS
    a, _ = analysis_of(seeded(_TwoOutputsOfOneInput()), torch.randn(2, 5, 8), torch.full((2,), 3.0))
    (reason,) = [r for r in a.reasons if r.kind == BLOCK_LEFT_UNCACHED][:1]
    assert reason.node is not None and reason.op, reason
    assert reason.source and "test_passes.py" in reason.source, reason
    assert a.why_uncacheable().startswith("blocks found but no cacheable region: block blocks.") and reason.source in \
        a.why_uncacheable()
    from models.toy_models import NoBlocks
    a, _ = analysis_of(seeded(NoBlocks()), torch.randn(2, 7, 5), torch.full((2,), 3.0))
    (none,) = a.reasons_of(NO_BLOCKS)
    assert "compile_model" in none.todo and str(none) in a.why_uncacheable()

"""Models that break Dynamo's graph inside every block, cached through ``compile_model``.

The toy model (``examples.models.breaking_dit``) switches on one construct at a time: a rotary
table built from ``grid_sizes.tolist()``, text tokens sliced to ``mask.sum().item()``,
gathered by ``nonzero``, and top-k mixture-of-experts routing. Under plain ``torch.compile``
each breaks the graph in every block, so ``torch.compile(model, backend=adacache_backend(...))``
finds no block. ``compile_model`` traces them under ``data_dependent_capture`` (scoped to this
model's calls). Checked for each: plain ``torch.compile`` breaks the graph; ours makes no more
graphs than plain and does not touch the global config; caching off is bit-identical to plain
``torch.compile``; ``{inf: 3}`` over 12 steps computes 1, 2, 5, 8, 11, 12 and attention runs in
the blocks on those steps only; no recompile inside a generation; at least 90% of a forward's
FLOPs sit in the cached region; MoReg sees the frames; every reused step returns the stem of
its input plus the cached delta."""
import pytest
import torch

from adacache_fx import AdaCacheConfig, adacache_backend, compile_model, data_dependent_capture, explain
from examples.models.breaking_dit import BreakingDiT, make_inputs
from helpers import INF, count_ops, no_recompiles, timesteps

CONTRACT_12 = [1, 2, 5, 8, 11, 12]
CONSTRUCTS = ["rope_tolist", "mask_item", "mask_nonzero", "moe"]


def _model(construct):
    torch.manual_seed(0)
    return BreakingDiT(**{construct: True}).eval()


def _euler(model, steps, seed=0, record=None):
    """A flow-Euler loop: the video changes every step with the output."""
    x, t0, grid, context, mask = make_inputs(2, steps[0], seed=seed)
    grid_t = list(steps) + [0.0]
    outs = []
    with torch.no_grad():
        for t, t_next in zip(grid_t, grid_t[1:]):
            if record is not None:
                record.append((x.clone(), t))
            v = model(x, torch.full((2,), float(t)), grid, context, mask)
            outs.append(v)
            x = x + (t_next - t) / 1000.0 * v
    return outs, (grid, context, mask)


def _graph_count(model, capture: bool) -> int:
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ctx = data_dependent_capture() if capture else torch._dynamo.config.patch({})
    with torch.no_grad(), ctx:
        torch.compile(model, backend=count)(*make_inputs(2, 500.0))
    return len(graphs)


@pytest.mark.parametrize("construct", CONSTRUCTS)
def test_plain_compile_breaks_and_compile_model_does_not(construct):
    model = _model(construct)
    plain = _graph_count(model, capture=False)
    assert plain > 1, f"{construct}: the toy should break the graph under the default config"
    assert _graph_count(model, capture=True) == 1 <= plain
    e = explain(model, *make_inputs(2, 500.0))
    assert len(e.graphs) == 1 and [r.block_paths for r in e.regions] == [[f"blocks.{i}" for i in range(4)]]
    assert e.frame_layout is not None and e.cached_flops_fraction >= 0.9, str(e)
    plain_e = explain(model, *make_inputs(2, 500.0), capture_data_dependent=False)
    assert len(plain_e.graphs) == plain and not plain_e.regions


@pytest.mark.parametrize("construct", CONSTRUCTS)
def test_caching_off_is_bit_identical_to_plain_compile(construct):
    model = _model(construct)
    plain, _ = _euler(torch.compile(model, backend="eager"), timesteps(6))
    torch._dynamo.reset()
    backend = compile_model(model, AdaCacheConfig.no_cache(num_steps=6), inner="eager")
    ours, _ = _euler(model, timesteps(6))
    assert not backend.uncached_graphs and backend.graphs[0].runners
    assert backend.report().computed_steps == list(range(1, 7))
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("construct", CONSTRUCTS)
def test_fixed_schedule_caches_the_whole_stack(construct):
    model = _model(construct)
    reference = _model(construct)                 # same weights, never compiled
    backend = compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="constant"), inner="eager")
    _euler(model, timesteps(12), seed=1)          # compile outside the count
    backend.reset()
    inputs: list = []
    result: list = []
    with no_recompiles():
        sdpa = count_ops(lambda: result.append(_euler(model, timesteps(12), record=inputs)))
    outs, (grid, context, mask) = result[0]
    report = backend.report()
    assert report.computed_steps == CONTRACT_12
    assert sdpa == len(CONTRACT_12) * 4           # attention ran in the 4 blocks on computed steps only
    assert report.cached_flops_fraction >= 0.9
    assert len(report.metrics) == 5 and all(m.motion is not None for m in report.metrics)
    # every step: the uncached model's head on (stem + the last computed step's stack delta)
    last_delta = None
    with torch.no_grad():
        for step, ((x, t), out) in enumerate(zip(inputs, outs), start=1):
            expected, delta = _stem_plus_delta(reference, x, t, grid, context, mask, last_delta, step in CONTRACT_12)
            last_delta = delta
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _stem_plus_delta(model, x, t, grid, context, mask, last_delta, computed):
    """The output a cached step must give, computed from the model's own parts."""
    b, c, f, h, w = x.shape
    from examples.models.breaking_dit import sinusoid
    temb = model.t_mlp(sinusoid(torch.full((b,), float(t)), model.dim))
    tokens = model.embed(x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c))
    ctx = model.embed_context(context)
    if computed:
        out = tokens
        for block in model.blocks:
            out = block(out, temb, grid, ctx, mask)
        last_delta = out - tokens
    head = model.out(tokens + last_delta) * (1 + temb.mean(-1))[:, None, None]
    return head.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3), last_delta


def test_the_capture_config_is_scoped_to_the_compiled_model():
    model, other = _model("rope_tolist"), _model("rope_tolist")
    compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    _euler(model, timesteps(3))
    assert torch._dynamo.config.capture_scalar_outputs is False
    assert torch._dynamo.config.capture_dynamic_output_shape_ops is False
    assert _graph_count(other, capture=False) > 1          # another model still compiles as before
    with pytest.raises(RuntimeError, match="already compiled"):
        compile_model(model, AdaCacheConfig())


def test_all_constructs_together_cache_and_match_without_caching():
    """The official-code style: every construct in every block at once."""
    torch.manual_seed(0)
    model = BreakingDiT(rope_tolist=True, mask_item=True, moe=True).eval()
    uncached, _ = _euler(model, timesteps(8))
    backend = compile_model(model, AdaCacheConfig.no_cache(num_steps=8), inner="eager")
    ours, _ = _euler(model, timesteps(8))
    assert len(backend.graphs) == 1 and backend.report().computed_steps == list(range(1, 9))
    for a, b in zip(ours, uncached):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----- packed video tokens: the frame count is a Python int argument -----------------------------
class PackedTokensDiT(BreakingDiT):
    """The same model, taking the video already packed as ``(B, F*H*W, C)`` frame-major with the
    frame count as an int (LTX-Video style): no 5-D input for MoReg to follow."""

    def forward(self, tokens, timestep, num_frames, grid_sizes, context, context_mask):
        from examples.models.breaking_dit import sinusoid
        temb = self.t_mlp(sinusoid(timestep, self.dim))
        h, context = self.embed(tokens), self.embed_context(context)
        for block in self.blocks:
            h = block(h, temb, grid_sizes, context, context_mask)
        return self.out(h) * (1 + temb.mean(-1))[:, None, None] * (num_frames / 3)


def _pack(x):
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)


def _unpack(tokens, like):
    b, c, f, h, w = like.shape
    return tokens.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def _packed_euler(model, steps):
    x, _, grid, context, mask = make_inputs(2, steps[0])
    grid_t = list(steps) + [0.0]
    with torch.no_grad():
        for t, t_next in zip(grid_t, grid_t[1:]):
            v = _unpack(model(_pack(x), torch.full((2,), float(t)), 3, grid, context, mask), x)
            x = x + (t_next - t) / 1000.0 * v


def test_packed_tokens_get_moreg_from_frames_arg():
    """``frames_arg="num_frames"``: the packed model's motion scores equal those of the same
    weights fed the 5-D video (whose frame axis the pass follows from the input)."""
    torch.manual_seed(0)
    video_model = BreakingDiT(rope_tolist=True).eval()
    packed = PackedTokensDiT(rope_tolist=True).eval()
    packed.load_state_dict(video_model.state_dict())
    config = dict(codebook={INF: 3}, num_steps=12)
    video_backend = compile_model(video_model, AdaCacheConfig(**config), inner="eager")
    _euler(video_model, timesteps(12))
    expected = video_backend.report()
    torch._dynamo.reset()
    backend = compile_model(packed, AdaCacheConfig(frames_arg="num_frames", **config), inner="eager")
    with no_recompiles():
        _packed_euler(packed, timesteps(12))
    got = backend.report()
    assert got.computed_steps == expected.computed_steps == CONTRACT_12
    assert all(m.motion is not None for m in got.metrics)
    for a, b in zip(got.metrics, expected.metrics):
        assert a.motion == pytest.approx(b.motion, rel=1e-4) and a.distance == pytest.approx(b.distance, rel=1e-4)
    e = explain(packed, _pack(make_inputs(2, 500.0)[0]), torch.full((2,), 500.0), 3, *make_inputs(2, 500.0)[2:],
                config=AdaCacheConfig(frames_arg="num_frames"))
    assert "packed tokens of input" in str(e) and e.frame_layout.probe_axis.frames == 3


def _motion_reference():
    """The motion scores (and computed steps) of the 5-D-input model under ``{inf: 3}``."""
    torch.manual_seed(0)
    video_model = BreakingDiT(rope_tolist=True).eval()
    torch._dynamo.reset()
    backend = compile_model(video_model, AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    _euler(video_model, timesteps(12))
    return video_model.state_dict(), backend.report()


def test_packed_frames_gives_the_frame_count_when_no_argument_does():
    """``packed_frames=3`` (the count itself, for a model whose frame count is no argument): the
    same motion scores as the 5-D model, through ``compile_model`` and plain ``torch.compile``."""
    weights, expected = _motion_reference()
    config = AdaCacheConfig(codebook={INF: 3}, num_steps=12, packed_frames=3)
    for entry in ("compile_model", "torch.compile"):
        packed = PackedTokensDiT(rope_tolist=True).eval()
        packed.load_state_dict(weights)
        torch._dynamo.reset()
        if entry == "compile_model":
            backend, model = compile_model(packed, config, inner="eager"), packed
        else:
            backend = adacache_backend(config, inner="eager")
            model = torch.compile(packed, backend=backend)
        with data_dependent_capture():
            _packed_euler(model, timesteps(12))
        got = backend.report()
        assert got.computed_steps == CONTRACT_12, entry
        for a, b in zip(got.metrics, expected.metrics):
            assert a.motion == pytest.approx(b.motion, rel=1e-4), entry
    for bad in (1, 0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="packed_frames"):
            AdaCacheConfig(packed_frames=bad)
    with pytest.raises(ValueError, match="set one"):
        AdaCacheConfig(packed_frames=3, frames_arg="num_frames")


class BreaksBeforeTheBlocks(torch.nn.Module):
    """HunyuanVideo-1.5-style: takes the 5-D video, branches in Python on a tensor's value before
    the blocks (a graph break that no capture setting removes), so the blocks' graph gets packed
    tokens and no 5-D input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, video, timestep, grid_sizes, context, context_mask):
        tokens = _pack(video)
        if bool(tokens.abs().sum() > 0):   # data-dependent branch: the graph breaks here
            tokens = tokens * 1.0
        return _unpack(self.inner(tokens, timestep, video.shape[2], grid_sizes, context, context_mask), video)


def test_frames_arg_naming_the_5d_video_gives_moreg_after_a_graph_break():
    """``frames_arg="video"``: the frame count comes from the call's 5-D input (its dim 2), so the
    blocks' graph, which only sees tokens after the break, gets MoReg with the 5-D model's scores."""
    weights, expected = _motion_reference()
    packed = PackedTokensDiT(rope_tolist=True).eval()
    packed.load_state_dict(weights)
    model = BreaksBeforeTheBlocks(packed)
    torch._dynamo.reset()
    backend = compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12, frames_arg="video"), inner="eager")
    _euler(model, timesteps(12))
    got = backend.report()
    assert len(backend.graphs) == 1 and got.computed_steps == CONTRACT_12
    for a, b in zip(got.metrics, expected.metrics):
        assert a.motion == pytest.approx(b.motion, rel=1e-4)
    x = make_inputs(2, 500.0)
    with pytest.raises(Exception, match="5-D video"):
        torch._dynamo.reset()
        explain(model, x[0], x[1], *x[2:], config=AdaCacheConfig(frames_arg="timestep"))


def test_packed_tokens_without_frames_arg_cache_with_moreg_off_and_bad_names_raise():
    torch.manual_seed(0)
    packed = PackedTokensDiT().eval()
    backend = compile_model(packed, AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    _packed_euler(packed, timesteps(12))
    assert backend.report().computed_steps == CONTRACT_12
    assert all(m.motion is None for m in backend.report().metrics)
    from adacache_fx import AdaCacheConfigError, adacache_backend
    with pytest.raises(AdaCacheConfigError, match="frames_arg='frames' names no argument"):
        compile_model(PackedTokensDiT(), AdaCacheConfig(frames_arg="frames"))
    with pytest.raises(ValueError, match="frames_arg"):
        AdaCacheConfig(frames_arg="")
    torch._dynamo.reset()      # under plain torch.compile the call's ints are not visible: say so
    compiled = torch.compile(PackedTokensDiT().eval(), backend=adacache_backend(AdaCacheConfig(frames_arg="num_frames")))
    with pytest.raises(Exception, match="only adacache_fx.compile_model"):
        _packed_euler(compiled, timesteps(2))


def test_plain_backend_on_a_breaking_model_runs_uncached_and_says_what_to_do():
    """Through ``torch.compile(model, backend=adacache_backend(...))`` the user's tracing config
    applies: the graph breaks, every fragment runs uncached with the same output, and the
    warning names Dynamo's break reason and the entry point that captures it."""
    from adacache_fx import AdaCacheWarning, adacache_backend
    model = _model("mask_item")
    backend = adacache_backend(AdaCacheConfig(num_steps=4), inner="eager")
    with pytest.warns(AdaCacheWarning) as record, torch.no_grad():
        out = torch.compile(model, backend=backend)(*make_inputs(2, 500.0))
        expected = model(*make_inputs(2, 500.0))
    assert not backend.graphs and backend.uncached_graphs
    messages = [str(r.message) for r in record]
    assert any("compile_model" in m and "capture_scalar_outputs" in m for m in messages), [m[-600:] for m in messages]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


class PrefixSegments(torch.nn.Module):
    """A model that Dynamo cannot trace with data-dependent ops captured: ``.tolist()`` of a
    slice whose length is itself data-dependent (as Qwen-Image 2.1's prefix segments)."""

    def __init__(self):
        super().__init__()
        from models.toy_models import ToyDiT
        torch.manual_seed(0)
        self.dit = ToyDiT().eval()

    def forward(self, x, timestep, ids, prefix):
        segments = ids[: int(prefix.sum().item())].tolist()
        return self.dit(x + 0.01 * len(segments), timestep)


def test_when_capture_fails_the_model_is_traced_as_plain_compile_traces_it():
    from adacache_fx import AdaCacheWarning
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    model = PrefixSegments()
    ids, prefix = torch.arange(6), torch.tensor([1, 1, 1, 0])
    x = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(GuardOnDataDependentSymNode), data_dependent_capture(), torch.no_grad():
        torch.compile(model, backend="eager")(x, torch.full((2,), 500.0), ids, prefix)
    torch._dynamo.reset()
    expected = []
    with torch.no_grad():
        for t in timesteps(6):
            expected.append(model(x, torch.full((2,), t), ids, prefix))
    backend = compile_model(model, AdaCacheConfig.no_cache(num_steps=6), inner="eager")
    with pytest.warns(AdaCacheWarning, match="traced as plain torch.compile"), torch.no_grad():
        outs = [model(x, torch.full((2,), t), ids, prefix) for t in timesteps(6)]
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert backend.graphs and backend.report().computed_steps == list(range(1, 7))   # the blocks' graph caches
    e = explain(PrefixSegments(), x, torch.full((2,), 500.0), ids, prefix)
    assert e.capture_failed and "GuardOnDataDependentSymNode" in e.capture_failed and e.regions


# ----- video tokens scattered into a packed sequence at positions an input gives ----------------
def _scattered_motions(model, video_indices, text_indices, steps=12):
    torch._dynamo.reset()
    backend = compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=steps, packed_frames=3,
                                                  reuse="constant"), inner="eager")
    with torch.no_grad():
        for step, t in enumerate(timesteps(steps)):
            g = torch.Generator().manual_seed(step)
            model(torch.randn(2, 60, 3, generator=g), torch.full((2,), float(t)), video_indices, text_indices)
    report = backend.report()
    assert report.computed_steps == CONTRACT_12
    return [m.motion for m in report.metrics]


def test_scattered_video_tokens_get_moreg_from_their_positions_input():
    """MiniMax-H3 packs text, video and audio rows into one sequence with ``index_copy`` at
    positions given as inputs: the frame axis follows the video rows to their positions
    (``FrameAxis.gather``), so the motion scores equal those of the same weights with the video
    tokens joined by ``cat`` (a run after the text), wherever the positions put them."""
    from models.toy_models import ToyScatteredVideo
    torch.manual_seed(0)
    joined = ToyScatteredVideo(use_cat=True).eval()
    scattered = ToyScatteredVideo().eval()
    scattered.load_state_dict(joined.state_dict())
    e = explain(scattered, torch.randn(2, 60, 3), torch.full((2,), 500.0), torch.arange(5, 65), torch.arange(5),
                config=AdaCacheConfig(packed_frames=3))
    assert e.frame_layout is not None and e.frame_layout.probe_axis.gather is not None, str(e)
    expected = _scattered_motions(joined, None, None)
    assert len(expected) == 5 and all(m is not None for m in expected)
    positions = torch.arange(65)
    interleaved_text = torch.tensor([0, 7, 20, 41, 64])           # text rows among the video rows
    video = positions[~torch.isin(positions, interleaved_text)]
    for video_indices, text_indices in ((torch.arange(5, 65), torch.arange(5)), (video, interleaved_text)):
        torch.manual_seed(0)
        model = ToyScatteredVideo().eval()
        model.load_state_dict(joined.state_dict())
        motions = _scattered_motions(model, video_indices, text_indices)
        assert motions == pytest.approx(expected, rel=1e-4)

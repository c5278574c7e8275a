"""The block-list guard (``compile_model(model, config, block_guard="modules")``): a model whose
graph breaks inside every block even with data-dependent ops captured (a Python loop over the
per-expert token counts: ``BreakingDiT(moe_loop=True)``, HiDream-Image's dispatch) caches at the
blocks' calls. Checked: no graph holds a block (the graph-level pass finds nothing and its warning
names the entry point); caching off is bit-identical to plain ``torch.compile``; ``{inf: 3}`` over
12 steps computes 1, 2, 5, 8, 11, 12, attention runs in the blocks on those steps only, and every
step's output is the model's head on (stem + the last computed stack delta), or its linear
forecast; guidance branches keep their own deltas; MoReg through ``frames_arg`` equals the float64
reference on the probe block's attention residual; no more graph breaks than plain ``torch.compile`` and
nothing compiled in a second generation; bad input raises naming the field; a model with no block
list runs uncached with a warning."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from adacache_fx import AdaCacheConfig, AdaCacheConfigError, AdaCacheWarning, compile_model, explain
from adacache_fx.ops.cache_metrics import cache_metrics_reference
from adacache_fx.runtime.policies import motion_score
from examples.models.breaking_dit import BreakingDiT, make_inputs, sinusoid as _sinusoid
from helpers import INF, count_ops, dynamo_counts, timesteps

CONTRACT_12 = [1, 2, 5, 8, 11, 12]


def _model():
    torch.manual_seed(0)
    return BreakingDiT(moe_loop=True).eval()


class _AttentionGraphs:
    """An eager inner compiler that counts the calls of the compiled graphs holding attention: the
    blocks run compiled, not eagerly."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        if not any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes):
            return gm.forward

        def run(*args):
            self.calls += 1
            return gm.forward(*args)
        return run


def _compile(model, inner="eager", **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)   # capture fails on .tolist(): traced as plain
        return compile_model(model, AdaCacheConfig(**config), inner=inner, block_guard="modules")


def _euler(model, steps, seed=0, record=None, contexts=None):
    """A flow-Euler loop (the video changes with every output); ``contexts``: guidance as one
    call per context per step (the last call's output drives the loop)."""
    x, _t, grid, context, mask = make_inputs(2, steps[0], seed=seed)
    grid_t = list(steps) + [0.0]
    outs = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)
        for t, t_next in zip(grid_t, grid_t[1:]):
            if record is not None:
                record.append((x.clone(), t))
            for ctx in contexts or [context]:
                v = model(x, torch.full((2,), float(t)), grid, ctx, mask)
                outs.append(v)
            x = x + (t_next - t) / 1000.0 * v
    return outs, (grid, context, mask)


def _parts(model, x, t, context):
    b, c, f, h, w = x.shape
    temb = model.t_mlp(_sinusoid(torch.full((b,), float(t)), model.dim))
    tokens = model.embed(x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c))
    return temb, tokens, model.embed_context(context)


def _head(model, tokens, temb, x):
    b, c, f, h, w = x.shape
    out = model.out(tokens) * (1 + temb.mean(-1))[:, None, None]
    return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def _expected(reference, inputs, grid, context, mask, reuse="constant"):
    """Each step's output from the uncached model's own parts: computed steps run the blocks;
    reused ones add the last delta (constant) or its extrapolation in t (linear)."""
    outs, deltas, times = [], [], []
    with torch.no_grad():
        for step, (x, t) in enumerate(inputs, start=1):
            temb, tokens, ctx = _parts(reference, x, t, context)
            if step in CONTRACT_12:
                out = tokens
                for block in reference.blocks:
                    out = block(out, temb, grid, ctx, mask)
                deltas, times = (deltas + [out - tokens])[-2:], (times + [t])[-2:]
                delta = deltas[-1]
            elif reuse == "linear" and len(deltas) == 2:
                delta = deltas[1] + (t - times[1]) / (times[1] - times[0]) * (deltas[1] - deltas[0])
            else:
                delta = deltas[-1]
            outs.append(_head(reference, tokens + delta, temb, x))
    return outs


def test_no_graph_holds_a_block_and_the_graph_guard_warning_names_the_module_guard():
    model = _model()
    e = explain(model, *make_inputs(2, 500.0))
    assert len(e.graphs) > 1 and not e.regions
    torch._dynamo.reset()
    with pytest.warns(AdaCacheWarning, match="block_guard='modules'"):
        graph_mode = copy.deepcopy(model)
        compile_model(graph_mode, AdaCacheConfig(num_steps=3), inner="eager", block_guard="graph")
        with torch.no_grad():
            graph_mode(*make_inputs(2, 500.0))


def test_the_default_guard_finds_the_breaks_inside_the_blocks_and_guards_their_calls():
    """No mode flag: the first call shows that Dynamo breaks inside the blocks, the guard is at
    their calls, the contract holds, and explain says which guard applies and why."""
    model = _model()
    e = explain(model, *make_inputs(2, 500.0))
    assert e.guard.guard == "modules" and "inside the blocks" in e.guard.why, str(e)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="constant"),
                                inner="eager")
        _euler(model, timesteps(12))
    assert [c.guard for c in backend.guard_choices] == ["modules"]
    assert backend.report().computed_steps == CONTRACT_12
    assert not [w for w in caught if "runs uncached" in str(w.message)], [str(w.message) for w in caught]


def test_caching_off_is_bit_identical_to_plain_compile():
    model = _model()
    plain, _ = _euler(torch.compile(copy.deepcopy(model), backend="eager"), timesteps(6))
    torch._dynamo.reset()
    backend = _compile(model, codebook={INF: 1}, num_steps=6)
    ours, _ = _euler(model, timesteps(6))
    guard = backend.graphs[0]
    assert [r.paths for r in guard.regions] == [[f"blocks.{i}" for i in range(4)]], guard.describe()
    assert backend.report().computed_steps == list(range(1, 7))
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reuse", ["constant", "linear"])
def test_fixed_schedule_skips_the_blocks_and_reuses_their_delta(reuse):
    model, reference = _model(), _model()
    attention_graphs = _AttentionGraphs()
    backend = _compile(model, inner=attention_graphs, codebook={INF: 3}, num_steps=12, reuse=reuse)
    _euler(model, timesteps(12), seed=1)          # observed + compiled outside the count
    backend.reset()
    attention_graphs.calls = 0
    inputs, result = [], []   # (the experts' Python loop specialises on routed counts: recompiles as plain
    sdpa = count_ops(lambda: result.append(_euler(model, timesteps(12), record=inputs)))   # torch.compile does)
    outs, (grid, context, mask) = result[0]
    report = backend.report()
    assert report.computed_steps == CONTRACT_12
    assert sdpa == len(CONTRACT_12) * 4           # attention ran in the 4 blocks on computed steps only,
    assert attention_graphs.calls == sdpa - len(CONTRACT_12)   # in their compiled graphs, but the probe block's
    #                                               own forward, run eagerly to follow its residual
    assert report.block_executions == 2 * len(CONTRACT_12)
    assert report.cached_flops_fraction >= 0.9 and len(report.metrics) == 5
    assert report.cache_bytes == (2 if reuse == "linear" else 1) * 2 * 60 * 32 * 4 + 2 * 60 * 32 * 4
    for step, (out, expected) in enumerate(zip(outs, _expected(reference, inputs, grid, context, mask, reuse)), 1):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_guidance_branches_keep_their_own_deltas():
    model, reference = _model(), _model()
    uncond = torch.zeros(2, 7, 16)
    backend = _compile(model, codebook={INF: 3}, num_steps=12, reuse="constant")
    inputs = []
    _x, _t, grid, context, mask = make_inputs(2, 1000.0)
    outs, _ = _euler(model, timesteps(12), record=inputs, contexts=[uncond, context])
    assert backend.report().computed_steps == CONTRACT_12
    for branch, ctx in enumerate([uncond, context]):
        expected = _expected(reference, inputs, grid, ctx, mask)
        for step, (out, exp) in enumerate(zip(outs[branch::2], expected), 1):
            torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5, msg=f"branch {branch}, step {step}")


def test_moreg_through_frames_arg_equals_the_reference_on_the_probe_blocks_attention_residual():
    model, reference = _model(), _model()
    backend = _compile(model, codebook={INF: 3}, num_steps=12, frames_arg="x")
    inputs = []
    _euler(model, timesteps(12), record=inputs)
    _x, _t, grid, context, mask = make_inputs(2, 1000.0)
    probes = []
    with torch.no_grad():
        for step, (x, t) in enumerate(inputs, start=1):
            if step in CONTRACT_12:
                temb, h, ctx = _parts(reference, x, t, context)
                for i, block in enumerate(reference.blocks):
                    out = block(h, temb, grid, ctx, mask)
                    if i == 2:   # the middle block of 4: the probe, its attention residual (branch 0)
                        shift, scale, gate_attn, _gate_mlp = block.ada(temb)[:, None].chunk(4, dim=-1)
                        residual = gate_attn * block.attention(block.norm1(h) * (1 + scale) + shift, grid, ctx, mask)
                        probes.append(residual.reshape(2, 3, -1))
                    h = out
    metrics = backend.report().metrics
    assert len(metrics) == 5
    for metric, current, previous in zip(metrics, probes[1:], probes[:-1]):
        sums = cache_metrics_reference(current, previous, 1).sum(0).tolist()
        assert metric.motion is not None
        assert metric.motion == pytest.approx(motion_score(sums), rel=1e-4)
        assert metric.distance == pytest.approx(sums[0] / sums[1] / max(1, metric.step - _previous(metric.step)),
                                                rel=1e-4)


def _previous(step):
    return CONTRACT_12[CONTRACT_12.index(step) - 1]


def _graph_counts(make):
    return dynamo_counts(make, lambda model: _euler(model, timesteps(3)))


def test_no_more_graph_breaks_than_plain_compile_and_nothing_compiled_twice():
    plain = _graph_counts(lambda count: torch.compile(_model(), backend=count))
    ours = _graph_counts(lambda count: (lambda m: (_compile(m, inner=count, num_steps=3), m)[1])(_model()))
    assert plain[1] >= 1 and ours[1] <= plain[1], (plain, ours)
    assert ours[0] <= plain[0] and ours[2] == plain[2] == 0, (plain, ours)


def test_under_inductor_the_contract_and_the_cached_delta_hold():
    model, reference = _model(), _model()
    backend = _compile(model, inner="inductor", codebook={INF: 3}, num_steps=12, reuse="constant")
    inputs = []
    outs, (grid, context, mask) = _euler(model, timesteps(12), record=inputs)
    assert backend.report().computed_steps == CONTRACT_12
    for out, expected in zip(outs, _expected(reference, inputs, grid, context, mask)):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


class _Projections(nn.Module):
    """A module list whose calls do not feed each other (per-input projections): no blocks."""

    def __init__(self):
        super().__init__()
        self.proj = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)])

    def forward(self, x, timestep):
        return sum(p(x * (i + 1)) for i, p in enumerate(self.proj)) * timestep[:, None, None]


def test_a_model_without_block_calls_runs_uncached_with_a_warning():
    model = _Projections().eval()
    x, t = torch.randn(2, 5, 8), torch.full((2,), 0.5)
    expected = model(x, t)
    backend = compile_model(model, AdaCacheConfig(num_steps=3), inner="eager", block_guard="modules")
    with pytest.warns(AdaCacheWarning, match="do not feed each other"):
        out = model(x, t)
    assert torch.equal(out, expected) and torch.equal(model(x, t), expected)
    report = backend.report()
    assert report.computed_steps == [] and "do not feed each other" in report.uncached_graphs[0]


def test_bad_input_raises_naming_the_problem():
    with pytest.raises(AdaCacheConfigError, match="block_guard"):
        compile_model(_model(), AdaCacheConfig(), block_guard="hooks")
    with pytest.raises(AdaCacheConfigError, match="no module list of blocks"):
        compile_model(nn.Sequential(nn.Linear(3, 3)), AdaCacheConfig(), block_guard="modules")
    with pytest.raises(AdaCacheConfigError, match="per_sample"):
        compile_model(_model(), AdaCacheConfig(per_sample=True), block_guard="modules")
    model = _model()
    torch._dynamo.reset()
    _compile(model, num_steps=3, probe_block="blocks.9")
    for _ in range(2):   # the failed first call leaves the guard unobserved: the next call says it again
        with pytest.raises(AdaCacheConfigError, match="probe_block"):
            _euler(model, timesteps(1))


class _TwoTimes(BreakingDiT):
    """A second floating (B,) argument: which one is the timestep is ambiguous."""

    def forward(self, x, timestep, grid_sizes, context, context_mask, guidance=None):
        return super().forward(x, timestep, grid_sizes, context, context_mask) * guidance[:, None, None, None, None]


def test_of_several_timestep_like_arguments_the_one_named_like_a_timestep_is_the_clock():
    """``timestep`` and ``guidance`` are both one float per row (STDiT3 has ``fps``, ``height``,
    ``width`` beside its ``timestep``): the one named like a timestep is read, without timestep_arg."""
    x, t, grid, context, mask = make_inputs(2, 500.0)
    for named in (None, "timestep"):
        torch.manual_seed(0)
        model = _TwoTimes(moe_loop=True).eval()
        torch._dynamo.reset()
        extra = {"timestep_arg": named} if named else {}
        backend = _compile(model, num_steps=3, codebook={INF: 1}, **extra)
        with torch.no_grad():
            for step in (900.0, 600.0, 300.0):
                model(x, torch.full((2,), step), grid, context, mask, guidance=torch.ones(2))
        assert backend.report().computed_steps == [1, 2, 3]
        assert backend.scheduler.clock.timestep == 300.0


# ----- how the blocks are called ----------------------------------------------------------------
class _FirstTokensBlock(nn.Module):
    """A block that updates the first two tokens only (the rest of its output is its input)."""

    def __init__(self, c):
        super().__init__()
        from models.toy_models import Block
        self.inner = Block(c)

    def forward(self, x, temb):
        return torch.cat([self.inner(x[:, :2], temb), x[:, 2:]], dim=1)


class _Stack(nn.Module):
    """Blocks of tests/models/toy_models.py in a list. ``keyword_on``: the steps (a set the test fills)
    on which the blocks get their stream by keyword, else by position; ``glue``: between two blocks
    the model adds a learned vector to token 0 in place; ``side_by_side``: the blocks all take the
    stem and their outputs are summed (no chain; each block changes two tokens of seven, so its
    output holds most of its input's values)."""

    def __init__(self, glue=False, side_by_side=False, depth=4, c=24):
        super().__init__()
        from models.toy_models import Block, seeded
        self.embed, self.t_mlp = nn.Linear(5, c), nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList([(_FirstTokensBlock if side_by_side else Block)(c) for _ in range(depth)])
        self.out, self.pos = nn.Linear(c, 5), nn.Parameter(torch.randn(c))
        self.c, self.glue, self.side_by_side, self.keyword_on, self.calls = c, glue, side_by_side, set(), 0
        seeded(self)

    def stem(self, x, timestep):
        from models.toy_models import sinusoid
        return self.embed(x), self.t_mlp(sinusoid(timestep, self.c))

    def forward(self, x, timestep):
        self.calls += 1
        h, temb = self.stem(x, timestep)
        if self.side_by_side:
            return self.out(sum(block(h, temb) for block in self.blocks))
        for i, block in enumerate(self.blocks):
            h = block(x=h, temb=temb) if self.calls in self.keyword_on else block(h, temb)
            if self.glue and i < len(self.blocks) - 1:
                h[:, :1] += self.pos
        return self.out(h)


def _stack_loop(model, steps=12):
    outs, inputs = [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)
        for step, t in enumerate(timesteps(steps)):
            x = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(step))
            inputs.append((x, torch.full((2,), float(t))))
            outs.append(model(*inputs[-1]))
    return outs, inputs


def _stack_expected(reference, inputs):
    """Computed steps run the blocks (and the glue between them); reused ones add the stack's
    last delta to the stem, glue included."""
    outs, delta = [], None
    with torch.no_grad():
        for step, (x, t) in enumerate(inputs, start=1):
            h0, temb = reference.stem(x, t)
            if step in CONTRACT_12:
                h = h0.clone()
                for i, block in enumerate(reference.blocks):
                    h = block(h, temb)
                    if reference.glue and i < len(reference.blocks) - 1:
                        h[:, :1] += reference.pos
                delta = h - h0
            outs.append(reference.out(h0 + delta))
    return outs


@pytest.mark.parametrize("glue", [False, True], ids=["plain", "in-place glue between blocks"])
def test_streams_by_keyword_or_position_and_glue_between_blocks(glue):
    """The blocks get their stream by keyword on some steps and by position on others (computed
    and reused ones); with glue between the blocks, a reused step adds it once (it is inside the
    cached delta), not once more per block."""
    model, reference = _Stack(glue=glue), _Stack(glue=glue)
    model.keyword_on = {2, 3, 7, 8, 11}   # computed (2, 8, 11) and reused (3, 7) calls
    backend = _compile(model, codebook={INF: 3}, num_steps=12, reuse="constant")
    outs, inputs = _stack_loop(model)
    guard = backend.graphs[0]
    assert [r.paths for r in guard.regions] == [[f"blocks.{i}" for i in range(4)]], guard.describe()
    assert backend.report().computed_steps == CONTRACT_12
    for step, (out, expected) in enumerate(zip(outs, _stack_expected(reference, inputs)), 1):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_blocks_side_by_side_are_no_block_list():
    """``sum(block(h) for block in blocks)``: each call takes the stem, not the previous call's
    output, so the list holds no chain of blocks: uncached, with a warning, outputs unchanged."""
    model = _Stack(side_by_side=True)
    x, t = torch.randn(2, 7, 5), torch.full((2,), 0.5)
    with torch.no_grad():
        expected = model(x, t)
        torch._dynamo.reset()
        backend = compile_model(model, AdaCacheConfig(num_steps=3), inner="eager", block_guard="modules")
        with pytest.warns(AdaCacheWarning, match="do not feed each other"):
            out = model(x, t)
    assert torch.equal(out, expected) and not backend.graphs[0].regions

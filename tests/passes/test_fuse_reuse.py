"""A reused step runs as one compiled graph (``rewrite.fuse_reuse``): the split top level with
each region replaced by its reuse piece, inlined, keeping only what the model's outputs need.

Every check compares against the same backend with the fused step switched off (the split top
level run piece by piece, as before the pass), on a loop whose latent changes every step."""
import pytest
import torch
import torch.fx as fx

import adacache_fx.passes.rewrite as rewrite_module
from adacache_fx import AdaCacheConfig, adacache_backend
from helpers import INF, euler_loop, label_branch, timesteps
from models.toy_models import ToyDiT, ToyFlowDiT, seeded

CONTRACT = [1, 2, 5, 8, 11, 12]   # {inf: 3} over 12 steps
REUSED = [s for s in range(1, 13) if s not in CONTRACT]


def _recording(inner):
    """An inner compiler that keeps every graph it is given."""
    seen = []

    def compile_(gm, example_inputs):
        seen.append(gm)
        return inner(gm, example_inputs) if inner is not None else gm.forward
    return compile_, seen


def _generation(make_model, make_inputs, fused: bool, inner=None, reuse="linear", branches=(None,)):
    torch._dynamo.reset()
    compile_, seen = _recording(inner)
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse=reuse), inner=compile_)
    compiled = torch.compile(seeded(make_model()), backend=backend)

    def before_step(t):
        if not fused:   # the piecewise path, as before the pass
            for g in backend.graphs:
                g.reuse_step = None
    run = euler_loop(compiled, make_inputs, timesteps(12), branches=branches, before_step=before_step)
    run.report = backend.report()   # before the next test's torch._dynamo.reset() resets the backend
    return run, backend, seen


def _toy_dit_inputs(batch, t):
    x = torch.randn(batch, 7, 5, generator=torch.Generator().manual_seed(1))
    return (x, torch.full((batch,), t)), {}


def _flow_inputs(batch, t):
    x = torch.randn(batch, 9, 12, generator=torch.Generator().manual_seed(2))
    return (x, torch.full((batch,), t), torch.zeros(batch, dtype=torch.long)), {}


def _fused_graph(seen) -> fx.GraphModule:
    found = [gm for gm in seen if any(n.op == "placeholder" and n.target.startswith("cached_delta")
                                      for n in gm.graph.nodes)]
    assert len(found) == 1, [gm.graph for gm in seen]
    return found[0]


@pytest.mark.parametrize("reuse", ["linear", "constant"])
@pytest.mark.parametrize("case", ["toy_dit", "flow_guidance"])
def test_fused_reused_steps_equal_the_piecewise_path(case, reuse):
    if case == "toy_dit":
        args = (ToyDiT, _toy_dit_inputs)
        kwargs = {}
    else:   # two guidance branches as separate calls: each its own deltas
        args = (ToyFlowDiT, _flow_inputs)
        kwargs = {"branches": [label_branch(1), label_branch(3)]}
    fused, fused_backend, _ = _generation(*args, fused=True, reuse=reuse, **kwargs)
    piecewise, piece_backend, _ = _generation(*args, fused=False, reuse=reuse, **kwargs)
    assert fused.report.computed_steps == piecewise.report.computed_steps == CONTRACT
    branches = len(fused.calls[0])
    assert sum(g.fused_reuses for g in fused_backend.graphs) == len(REUSED) * branches
    assert sum(g.fused_reuses for g in piece_backend.graphs) == 0
    assert fused.report.block_executions == piecewise.report.block_executions
    for step, (row_f, row_p) in enumerate(zip(fused.calls, piecewise.calls), start=1):
        for b, (cf, cp) in enumerate(zip(row_f, row_p)):
            # the same aten ops in the same order (the eager inner): bit for bit
            assert torch.equal(cf.output, cp.output), f"step {step}, branch {b}"
    assert torch.equal(fused.final, piecewise.final)


def test_fused_graph_keeps_only_what_the_outputs_need():
    """ToyFlowDiT's time and label embeddings feed the blocks only, and its skeleton is the
    identity: a reused step is ``x + delta`` and nothing else (no attention, no linear layer)."""
    _, backend, seen = _generation(ToyFlowDiT, _flow_inputs, fused=True, reuse="constant")
    gm = _fused_graph(seen)
    ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [n.target for n in ops] == [torch.add], gm.graph
    deltas = [n for n in gm.graph.nodes if n.op == "placeholder" and n.target.startswith("cached_delta")]
    assert len(deltas) == 1 and ops[0].args[1] is deltas[0]
    # the piecewise top level still holds the embeddings (they feed the blocks on computed steps)
    assert any("linear" in str(n.target) for piece in seen if piece is not gm for n in piece.graph.nodes)


def test_fused_graph_forecasts_the_delta_inside_it():
    """Under linear reuse the forecast ``delta + slope * r`` is in the fused graph (its slope and
    coefficient are inputs), so the inner compiler fuses it with the rest: ``x + (delta + slope * r)``."""
    _, backend, seen = _generation(ToyFlowDiT, _flow_inputs, fused=True, reuse="linear")
    gm = _fused_graph(seen)
    ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [n.target for n in ops] == [torch.select, torch.mul, torch.add, torch.add], gm.graph
    inputs = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    select, mul, forecast, out = ops
    assert select.args == (inputs["forecast_coefficients"], 0, 0)
    assert mul.args == (inputs["forecast_term_0_0_0"], select)
    assert forecast.args == (inputs["cached_delta_0_0"], mul)
    assert out.args[1] is forecast


def test_fused_graph_keeps_the_head_and_the_time_embedding_it_reads():
    _, _, seen = _generation(ToyDiT, _toy_dit_inputs, fused=True)
    gm = _fused_graph(seen)
    targets = [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]
    assert "scaled_dot_product_attention" not in targets and "layer_norm" not in targets, targets
    assert targets.count("linear") == 4, targets   # embed, the time MLP's two layers, the output head


def test_inductor_fused_reused_steps_match_the_piecewise_path():
    from torch._inductor.compile_fx import compile_fx

    fused, backend, _ = _generation(ToyDiT, _toy_dit_inputs, fused=True, inner=compile_fx)
    piecewise, _, _ = _generation(ToyDiT, _toy_dit_inputs, fused=False, inner=compile_fx)
    assert sum(g.fused_reuses for g in backend.graphs) == len(REUSED)
    for row_f, row_p in zip(fused.calls, piecewise.calls):
        torch.testing.assert_close(row_f[0].output, row_p[0].output, rtol=1e-5, atol=1e-6)


def test_a_graph_that_cannot_be_fused_reuses_piece_by_piece(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("not fusable here")
    monkeypatch.setattr(rewrite_module, "fuse_reuse", refuse)
    unfused, backend, _ = _generation(ToyDiT, _toy_dit_inputs, fused=True)
    assert unfused.report.computed_steps == CONTRACT
    assert all(g.reuse_step is None and g.fused_reuses == 0 for g in backend.graphs)
    monkeypatch.undo()
    fused, _, _ = _generation(ToyDiT, _toy_dit_inputs, fused=True)
    for row_u, row_f in zip(unfused.calls, fused.calls):
        assert torch.equal(row_u[0].output, row_f[0].output)


def test_a_fused_step_that_fails_at_run_time_falls_back_to_the_pieces_with_a_warning():
    piecewise, _, _ = _generation(ToyDiT, _toy_dit_inputs, fused=False)
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(seeded(ToyDiT()), backend=backend)

    def refuse(*args):
        raise AssertionError("expected size 2==2, stride 512==704 at dim=0")

    def before_step(t):
        for g in backend.graphs:
            if g.reuse_step is not None:
                g.reuse_step = refuse
    with pytest.warns(UserWarning, match="fused reused step failed .*piece by piece"):
        run = euler_loop(compiled, _toy_dit_inputs, timesteps(12), before_step=before_step)
    assert backend.report().computed_steps == CONTRACT
    assert all(g.reuse_step is None and g.fused_reuses == 0 for g in backend.graphs)
    for row_r, row_p in zip(run.calls, piecewise.calls):
        assert torch.equal(row_r[0].output, row_p[0].output)

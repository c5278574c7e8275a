"""The core zoo models (tests/zoo): eager determinism, non-vacuous residuals, one Dynamo graph
with fullgraph=True that matches eager, and nn_module_stack naming the block lists.

Only the cases flagged ``core`` run here (the wider diffusers coverage is the matrix in
benchmarks/results/coverage.md, run by ``PYTHONPATH=tests python -m zoo.coverage run`` from the
repository root)."""

from __future__ import annotations

import os

import pytest
import torch


from zoo import ZOO, core_cases, get_case, get_output, normalize_module_path  # noqa: E402

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

CORE = ["ref_dit", "ref_stdit", "dit", "pixart", "latte"]

_models: dict[str, torch.nn.Module] = {}
_compiled: dict[str, tuple] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _models:
        _models[name] = get_case(name).build()
    return _models[name]


def _compile(name: str):
    """(graphs, compiled output, eager output) for batch 2, t=500, cached per case."""
    if name not in _compiled:
        case = get_case(name)
        model = _model(name)
        args, kwargs = case.make_inputs(2, 500.0)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            eager = get_output(model(*args, **kwargs))
            compiled = get_output(torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs))
        torch._dynamo.reset()
        _compiled[name] = (graphs, compiled, eager)
    return _compiled[name]


def test_registry_api():
    assert sorted(c.name for c in core_cases()) == sorted(CORE)
    for name in CORE:
        case = ZOO[name]
        assert case.core and case.block_lists and case.num_blocks > 0
        args, kwargs = case.make_inputs(3, 250.0)
        ts = [v for v in list(args) + list(kwargs.values())
              if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.shape == (3,)]
        assert ts and all(torch.all(v == 250.0) for v in ts), name
        a2, k2 = case.make_inputs(3, torch.tensor([1.0, 2.0, 3.0]))
        assert any(isinstance(v, torch.Tensor) and torch.equal(v, torch.tensor([1.0, 2.0, 3.0]))
                   for v in list(a2) + list(k2.values()))
    with pytest.raises(KeyError):
        get_case("no-such-model")


@pytest.mark.parametrize("name", CORE)
def test_eager_deterministic_and_residuals_nonzero(name):
    case = get_case(name)
    model = _model(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    args, kwargs = case.make_inputs(2, 500.0)
    # per-block residual magnitude via hooks: every block must change the residual stream
    rel = []

    def hook(mod, inp, out):
        x_in = inp[0] if inp else None
        x_out = get_output(out)
        if isinstance(x_in, torch.Tensor) and x_in.shape == x_out.shape:
            rel.append(float((x_out - x_in).norm() / x_in.norm().clamp_min(1e-12)))

    handles = []
    for path in case.block_lists:
        blocks = model.get_submodule(path)
        handles += [b.register_forward_hook(hook) for b in blocks]
    try:
        with torch.no_grad():
            out1 = case.output(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out2 = case.output(model(*args, **kwargs))
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2), "eager forward is not deterministic"
    assert 1e-3 < float(out1.std()) < 1e3
    n_blocks = sum(len(model.get_submodule(p)) for p in case.block_lists)
    assert n_blocks == case.num_blocks
    assert len(rel) == case.num_blocks, rel
    assert min(rel) > 1e-3, f"a block's residual is (near) zero: {rel}"
    # inputs and weights are seeded: a second build and fresh inputs give the same output
    args_b, kwargs_b = case.make_inputs(2, 500.0)
    with torch.no_grad():
        out3 = case.output(case.build()(*args_b, **kwargs_b))
    assert torch.equal(out1, out3)
    # different timestep -> different output (timestep actually conditions the model)
    args_c, kwargs_c = case.make_inputs(2, 100.0)
    with torch.no_grad():
        out4 = case.output(model(*args_c, **kwargs_c))
    assert not torch.allclose(out1, out4)
    # expected output shape
    x = args[0]
    assert out1.shape[0] == x.shape[0] and out1.shape[2:] == x.shape[2:]


@pytest.mark.parametrize("name", CORE)
def test_compile_fullgraph_matches_eager(name):
    graphs, compiled, eager = _compile(name)
    assert len(graphs) == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CORE)
def test_graph_has_module_stack_with_block_lists(name):
    case = get_case(name)
    graphs, _, _ = _compile(name)
    gm = graphs[0]
    call_nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    with_stack = [n for n in call_nodes if n.meta.get("nn_module_stack")]
    assert len(with_stack) > len(call_nodes) // 2
    seen = set()
    for n in with_stack:
        for path, _cls in n.meta["nn_module_stack"].values():
            parts = normalize_module_path(path).split(".")
            if len(parts) >= 2 and parts[1].isdigit():
                seen.add((parts[0], int(parts[1])))
    for lst in case.block_lists:
        n = len(_model(name).get_submodule(lst))
        for i in range(n):
            assert (lst, i) in seen, f"{lst}.{i} not in the graph's nn_module_stack"


def test_every_diffusers_transformer_class_is_accounted_for():
    """Each ModelMixin class in diffusers.models.transformers is a zoo case, or listed (with a reason)
    as not a DiT denoiser / not coverable."""
    from zoo import diffusers_cases as dc

    covered = dc.covered_classes()
    missing = [c for c in dc.transformer_classes() if c not in covered and c not in dc.NOT_DIT
               and c not in dc.NOT_COVERED]
    assert not missing, f"diffusers transformer classes without a zoo case or a reason: {missing}"
    assert not (set(covered) & set(dc.NOT_DIT)), "a class is both a case and listed as not a DiT"
    assert {n for n, c in ZOO.items() if c.core} == set(CORE)


_ALL = os.environ.get("ADACACHE_ZOO_ALL", "") not in ("", "0")


# parametrised only when asked for, so the default run stays short and quiet
@pytest.mark.skipif(not _ALL, reason="set ADACACHE_ZOO_ALL=1 to run every zoo case eagerly (about 2 minutes)")
@pytest.mark.parametrize("name", sorted(n for n in ZOO if n not in CORE) if _ALL else ["(all non-core cases)"])
def test_noncore_case_runs_eagerly(name):
    case = get_case(name)
    model = case.build()
    with torch.no_grad():
        out1 = case.run(model, 2, 500.0 if case.t_max >= 10 else 0.5)
        out2 = case.run(model, 2, 500.0 if case.t_max >= 10 else 0.5)
    assert torch.isfinite(out1).all() and torch.equal(out1, out2)
    assert sum(len(model.get_submodule(p)) for p in case.block_lists) == case.num_blocks

"""Each repeated block compiled once (``AdaCacheConfig(compile_blocks="once")``, and by default
(``"auto"``) where at least 8 blocks share one graph;
``compile/compile_blocks.py``): a region's piece cut into one subgraph per block, blocks whose
subgraphs match share one compile, each called with its own weights. The compiles of a region do
not grow with the depth; caching off is bit-identical to the uncached model (eager inner); cached
runs equal the region compiled whole."""
import math

import pytest
import torch

from adacache_fx import AdaCacheConfig, adacache_backend
from adacache_fx.compile.compile_blocks import _partition
from helpers import euler_loop, timesteps
from models.toy_models import ToyDiT, seeded

INF = math.inf


def _inputs(batch, t):
    x = torch.randn(batch, 9, 5, generator=torch.Generator().manual_seed(3))
    return (x, torch.full((batch,), t)), {}


def _run(depth, compile_blocks, codebook):
    torch._dynamo.reset()
    compiled_sizes = []

    def counting(gm, example_inputs):
        compiled_sizes.append(sum(n.op == "call_function" for n in gm.graph.nodes))   # ops, not inputs
        return gm.forward
    model = seeded(ToyDiT(depth=depth), 0)
    backend = adacache_backend(AdaCacheConfig(codebook=codebook, num_steps=12, compile_blocks=compile_blocks),
                               inner=counting)
    run = euler_loop(torch.compile(model, backend=backend), _inputs, timesteps(12))
    return model, backend, run, compiled_sizes


@pytest.mark.parametrize("depth", [4, 9])
def test_caching_off_is_the_uncached_model_and_blocks_compile_once(depth):
    model, backend, run, sizes = _run(depth, "once", {INF: 1})
    plain = euler_loop(model, _inputs, timesteps(12))
    assert all(torch.equal(a, b) for a, b in zip(run.outputs(), plain.outputs()))
    (info,) = backend.graphs[0].block_compiles.values()
    assert info.by_block and info.blocks == depth
    # every block shares one compile: the probe block's, which returns its residual as well
    assert info.shared[0] == depth and info.compiles <= 3


def test_the_compiles_do_not_grow_with_the_depth():
    shallow, deep = _run(4, "once", {INF: 3})[3], _run(9, "once", {INF: 3})[3]
    assert len(shallow) == len(deep)
    whole_shallow, whole_deep = _run(4, "whole", {INF: 3})[3], _run(9, "whole", {INF: 3})[3]
    assert max(whole_deep) > max(whole_shallow) and max(deep) == max(shallow)   # the most ops compiled at once


def test_cached_runs_equal_the_region_compiled_whole():
    _m, once_backend, once, _ = _run(5, "once", {INF: 3})
    assert once_backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
    _m, _b, whole, _ = _run(5, "whole", {INF: 3})
    assert all(torch.equal(a, b) for a, b in zip(once.outputs(), whole.outputs()))


def test_interleaved_blocks_are_compiled_whole():
    """Blocks whose nodes interleave in the graph have no span of their own: no partition."""
    import torch.fx as fx
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.neg, (x,), name="a")
    b = graph.call_function(torch.neg, (x,), name="b")
    c = graph.call_function(torch.add, (a, b), name="c")
    graph.output(c)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert _partition(gm, [{"a", "c"}, {"b"}]) is None
    assert _partition(gm, [{"a"}, {"b", "c"}]) == {"x": 0, "a": 1, "b": 3, "c": 3, "output": 4}


def test_block_subgraphs_return_tuples_for_compilers_that_need_them():
    """``aot_eager`` (as inductor's front end) takes only graphs returning a tuple: a block whose
    subgraph returns one value is compiled returning a 1-tuple and unpacked by its caller."""
    torch._dynamo.reset()
    model = seeded(ToyDiT(depth=4), 0)
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12, compile_blocks="once"),
                               inner="aot_eager")
    run = euler_loop(torch.compile(model, backend=backend), _inputs, timesteps(12))
    assert backend.report().uncached_graphs == [] and backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
    (info,) = backend.graphs[0].block_compiles.values()
    assert info.by_block and info.shared[0] == 4
    plain = euler_loop(model, _inputs, timesteps(12))
    torch.testing.assert_close(run.outputs()[0], plain.outputs()[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth, by_block", [(4, False), (9, True)])
def test_auto_compiles_block_by_block_from_eight_blocks(depth, by_block):
    _model, backend, run, _sizes = _run(depth, "auto", {INF: 3})
    (info,) = backend.graphs[0].block_compiles.values()
    assert info.by_block == by_block
    if not by_block:
        assert "compile_blocks='auto'" in info.why_whole

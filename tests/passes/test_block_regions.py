"""Each repeated block traced once by Dynamo (``block_regions.py``: ``compile_model`` marks the blocks
as nested compile regions where ``compile_blocks`` compiles them once) and the regions' bodies
inlined again before the analysis (``passes/inline_subgraphs.py``), each copy with its own block's
module stack. Caching off stays the uncached model bit for bit; a block that breaks Dynamo's graph
cannot be a region and is traced as before; ``uncompile_model`` gives the blocks their class back."""
import math

import pytest
import torch

import adacache_fx.backend as backend_module
from adacache_fx import AdaCacheConfig
from adacache_fx.compile_model import compile_model, uncompile_model
from adacache_fx.passes.analysis.find_blocks import find_blocks
from adacache_fx.passes.inline_subgraphs import inline_subgraphs, is_wrapper
from adacache_fx.passes.rewrite import copy_graph_module
from helpers import euler_loop, timesteps
from models.toy_models import Block, ToyDiT, seeded

INF = math.inf


class _MarkedBlock(Block):
    """A block its author marked, as Hugging Face's layers are."""

    @torch.compiler.nested_compile_region
    def forward(self, x, temb):
        return super().forward(x, temb)


class _BranchingBlock(Block):
    """A block with a Python branch on a tensor's value: Dynamo breaks its graph inside it."""

    def forward(self, x, temb):
        if x.mean() > 1e6:   # never taken: the output is the block's
            x = x * 2
        return super().forward(x, temb)


def _inputs(batch, t):
    x = torch.randn(batch, 9, 5, generator=torch.Generator().manual_seed(3))
    return (x, torch.full((batch,), t)), {}


def _dit(depth, block_cls=Block):
    model = seeded(ToyDiT(depth=depth), 0)
    for k, block in enumerate(model.blocks):
        marked = block_cls(24)
        marked.load_state_dict(block.state_dict())
        model.blocks[k] = marked
    return model


def _dynamo_graph(model):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(*_inputs(2, 500.0)[0])
    assert len(graphs) == 1
    return graphs[0]


def test_a_marked_block_is_inlined_with_its_own_module_stack():
    gm, example_inputs = _dynamo_graph(_dit(5, _MarkedBlock))
    regions = [n for n in gm.graph.nodes if is_wrapper(n)]
    assert len(regions) == 5 and len({n.args[1] for n in regions}) == 1   # traced once, stamped out
    work = inline_subgraphs(copy_graph_module(gm))
    assert not any(is_wrapper(n) for n in work.graph.nodes)
    blocks = find_blocks(work.graph)
    assert [b.path for b in blocks] == [f"blocks.{k}" for k in range(5)]
    assert len({id(n) for b in blocks for n in b.nodes}) == sum(len(b.nodes) for b in blocks)
    assert len({len(b.nodes) for b in blocks}) == 1 and len(blocks[0].nodes) > 5
    with torch.no_grad():
        assert torch.equal(gm(*example_inputs)[0], work(*example_inputs)[0])


def _spy_inlining(monkeypatch):
    """The wrapper ops of each graph the backend receives from Dynamo."""
    received = []

    def spy(gm):
        received.append([n.target for n in gm.graph.nodes if is_wrapper(n)])
        return inline_subgraphs(gm)
    monkeypatch.setattr(backend_module, "inline_subgraphs", spy)
    return received


COMPILED = []   # the op count of each graph the inner compiler got


def _eager(gm, example_inputs):
    COMPILED.append(sum(n.op == "call_function" for n in gm.graph.nodes))
    return gm.forward


@pytest.mark.parametrize("codebook", [{INF: 1}, {INF: 3}])
def test_compile_model_traces_each_block_once_and_computes_the_uncached_model(monkeypatch, codebook):
    received = _spy_inlining(monkeypatch)
    torch._dynamo.reset()
    COMPILED.clear()
    model, reference = _dit(6), _dit(6)
    backend = compile_model(model, AdaCacheConfig(codebook=codebook, num_steps=12, compile_blocks="once"),
                            inner=_eager)
    assert type(model.blocks[0]) is not Block and isinstance(model.blocks[0], Block)
    assert type(model.blocks[0]).__name__ == "Block"
    run = euler_loop(model, _inputs, timesteps(12))
    assert [len(r) for r in received] == [6]   # one graph, each of its 6 blocks a nested region
    (info,) = backend.graphs[0].block_compiles.values()
    assert info.by_block and info.blocks == 6 and info.shared[0] == 6
    # only the block is compiled (once, for all six); the prologue, epilogue and glue run as traced,
    # and no fused reused step compiles them again
    assert info.compiles == 1 and len(COMPILED) == 1 and COMPILED[0] > 5, (info, COMPILED)
    assert backend.graphs[0].reuse_step is None
    if codebook == {INF: 1}:
        plain = euler_loop(reference, _inputs, timesteps(12))
        assert all(torch.equal(a, b) for a, b in zip(run.outputs(), plain.outputs()))
    else:
        assert backend.report(model).computed_steps == [1, 2, 5, 8, 11, 12]
        # the same schedule with every block inlined by Dynamo: the same outputs
        torch._dynamo.reset()
        whole = compile_model(reference, AdaCacheConfig(codebook=codebook, num_steps=12, compile_blocks="whole"),
                              inner=_eager)
        inlined = euler_loop(reference, _inputs, timesteps(12))
        assert whole.report(reference).computed_steps == [1, 2, 5, 8, 11, 12]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(run.outputs(), inlined.outputs()))
    uncompile_model(model)
    assert all(type(b) is Block for b in model.blocks)


def test_whole_and_few_blocks_are_not_marked():
    torch._dynamo.reset()
    whole = _dit(9)
    compile_model(whole, AdaCacheConfig(codebook={INF: 1}, num_steps=12, compile_blocks="whole"), inner=_eager)
    few = _dit(4)
    compile_model(few, AdaCacheConfig(codebook={INF: 1}, num_steps=12), inner=_eager)   # auto: < 8 blocks
    many = _dit(8)
    compile_model(many, AdaCacheConfig(codebook={INF: 1}, num_steps=12), inner=_eager)
    assert all(type(b) is Block for b in list(whole.blocks) + list(few.blocks))
    assert all(type(b) is not Block for b in many.blocks)


def test_a_block_that_breaks_the_graph_is_traced_as_before(recwarn):
    torch._dynamo.reset()
    model, reference = _dit(6, _BranchingBlock), _dit(6, _BranchingBlock)
    backend = compile_model(model, AdaCacheConfig(codebook={INF: 1}, num_steps=12, compile_blocks="once"),
                            inner=_eager)
    run = euler_loop(model, _inputs, timesteps(12))
    plain = euler_loop(reference, _inputs, timesteps(12))
    assert all(torch.equal(a, b) for a, b in zip(run.outputs(), plain.outputs()))
    assert all(type(b) is _BranchingBlock for b in model.blocks)   # the marks are gone
    assert backend.guard_choices[-1].guard == "modules"   # as without the marks: the blocks are guarded at their calls
    assert not [w for w in recwarn if "data-dependent" in str(w.message)]   # capture stays on


def test_a_block_with_a_forward_of_its_own_is_left_unmarked():
    torch._dynamo.reset()
    model = _dit(6)
    hooked = model.blocks[2]
    hooked.forward = lambda x, temb: Block.forward(hooked, x, temb)   # a hook's wrapper on the instance
    compile_model(model, AdaCacheConfig(codebook={INF: 1}, num_steps=12, compile_blocks="once"), inner=_eager)
    assert type(hooked) is Block and type(model.blocks[1]) is not Block
    with torch.no_grad():
        assert torch.equal(model(*_inputs(2, 500.0)[0]), _dit(6)(*_inputs(2, 500.0)[0]))


def test_blocks_marked_by_their_author_are_cached_under_plain_torch_compile():
    from adacache_fx import adacache_backend
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner=_eager)
    run = euler_loop(torch.compile(_dit(5, _MarkedBlock), backend=backend), _inputs, timesteps(12))
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12] and not backend.uncached_graphs
    torch._dynamo.reset()
    inlined = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner=_eager)
    reference = euler_loop(torch.compile(_dit(5), backend=inlined), _inputs, timesteps(12))
    assert all(torch.equal(a, b) for a, b in zip(run.outputs(), reference.outputs()))

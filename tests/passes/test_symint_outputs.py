"""Shape arithmetic computed inside a block and used after the block stack is no stream.

Under dynamic shapes Dynamo records ``x.shape[1] // 2`` as a SymInt node inside the first block
that uses it (here ``blocks.0``); a later use (the head's slice) makes it an output of every block
run that holds it. It used to reject those blocks ("its output floordiv ... (shape SymInt) is
neither a residual stream nor ..."): diffusers' Ulysses attention computes its all-to-all split
sizes that way in every block. Now scalars are left out of a region's outputs, and the reuse path
recomputes them from its inputs' sizes.
"""

import torch
import torch.nn as nn

from adacache_fx import AdaCacheConfig, compile_model
from adacache_fx.passes.analysis import analyze

INF = float("inf")


class HalvingBlock(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.a, self.b = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        half = x.shape[1] // 2                       # a SymInt under dynamic shapes
        x = x + self.a(x).narrow(1, 0, half).repeat(1, 2, 1)
        return x + self.b(x), half


class SymIntAfterBlocks(nn.Module):
    def __init__(self, c=16, depth=3):
        super().__init__()
        self.inp, self.t = nn.Linear(c, c), nn.Linear(1, c)
        self.blocks = nn.ModuleList([HalvingBlock(c) for _ in range(depth)])
        self.out = nn.Linear(c, c)

    def forward(self, x, t):
        x = self.inp(x) + self.t(t[:, None, None])
        for block in self.blocks:
            x, half = block(x)
        return self.out(x)[:, :2 * half]               # the block's SymInt used after the stack


def test_symint_used_after_blocks_is_not_a_region_output():
    torch.manual_seed(0)
    model = SymIntAfterBlocks().eval()
    analyses = []

    def backend(gm, example_inputs):
        analyses.append(analyze(gm.graph, AdaCacheConfig(num_steps=6)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=True)(torch.randn(1, 8, 16), torch.ones(1))
    (analysis,) = analyses
    scalars = [n for n in analysis.graph.nodes if n.name.startswith("floordiv")]
    assert scalars and any(u not in analysis.regions[0].nodes for u in scalars[0].users)
    assert [r.block_paths for r in analysis.regions] == [["blocks.0", "blocks.1", "blocks.2"]], analysis.log


def test_symint_used_after_blocks_caches_and_reuses_under_dynamic_shapes():
    torch.manual_seed(0)
    model = SymIntAfterBlocks().eval()
    plain = SymIntAfterBlocks().eval()
    plain.load_state_dict(model.state_dict())
    backend = compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=6), inner="eager", dynamic=True)
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        for t in torch.linspace(1000.0, 100.0, 6):
            out = model(x, t.reshape(1))
            assert out.shape == plain(x, t.reshape(1)).shape
    report = backend.report()
    assert report.uncached_graphs == []
    assert report.computed_steps == [1, 2, 5, 6]
    assert [r.blocks for r in report.regions] == [["blocks.0", "blocks.1", "blocks.2"]]

"""``passes/inline_subgraphs.py``: Dynamo's activation-checkpoint op (``tag_activation_checkpoint``,
a body subgraph per call) is inlined before the analysis, nested ones included, the tuple it
returns used whole or by item; the inlined graph computes exactly what Dynamo's graph computes."""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from adacache_fx.passes.inline_subgraphs import inline_subgraphs, is_wrapper
from adacache_fx.passes.rewrite import copy_graph_module


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, scale):
        return x + torch.tanh(self.lin(x)) * scale, scale * 2


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, scale):
        pair = checkpoint(self.inner, x, scale, use_reentrant=False)   # nested, the tuple used whole
        x, scale = pair
        return x + self.lin(x) * scale


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Outer() for _ in range(3))

    def forward(self, x, scale):
        for block in self.blocks:
            x = checkpoint(block, x, scale, use_reentrant=False)
        return x


def _graph():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Model().eval()
    with torch.no_grad():
        torch.compile(model, backend=capture)(torch.randn(2, 5, 8), torch.randn(2, 1, 1))
    assert len(graphs) == 1
    return graphs[0]


def test_every_checkpoint_is_inlined_and_the_graph_computes_the_same():
    gm, example_inputs = _graph()
    assert any(is_wrapper(n) for n in gm.graph.nodes)
    work = inline_subgraphs(copy_graph_module(gm))
    assert not any(is_wrapper(n) for n in work.graph.nodes)
    assert not any(n.op == "get_attr" and "wrap_body" in str(n.target) for n in work.graph.nodes)
    assert sum(n.target is torch.tanh for n in work.graph.nodes) == 3   # the nested bodies too
    with torch.no_grad():
        want, got = gm(*example_inputs), work(*example_inputs)
    for a, b in zip(want if isinstance(want, (tuple, list)) else [want], got if isinstance(got, (tuple, list)) else [got]):
        assert torch.equal(a, b)


def test_a_graph_without_checkpoints_is_returned_unchanged():
    gm, _ = _graph()
    work = inline_subgraphs(copy_graph_module(gm))
    again = inline_subgraphs(work)
    assert again is work and [n.name for n in again.graph.nodes] == [n.name for n in work.graph.nodes]

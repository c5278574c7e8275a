"""Choose the probe: the tensor whose change across steps drives the schedule.

Rule ``residual branch`` (as the official AdaCache code): a middle block's first residual
branch, which is its self-attention, in the region with the most blocks. ``probe_block`` picks
another block by index (graph order over that region's blocks, negative from the end) or by
module path;
``probe_branch`` picks another residual of that block (0: attention, then cross-attention / MLP).

Rule ``block delta``, when the region's primary stream has no residual add inside a block
(post-norm or masked blocks, a boundary stream): the probe is the middle block's own output
delta ``out - in`` on that stream (``probe_block`` still picks the block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx

from ...errors import AdaCacheConfigError
from .find_regions import Region, ResidualAdd
from .graph_nodes import example_value, is_parameter_placeholder, sizes_equal
from .resolve_probe import block_index, find_named_block


@dataclass
class Probe:
    region: int                          # index of the region holding it
    block: str                           # module path of the block
    branch_index: int
    residual: Optional[ResidualAdd]      # rule "residual branch": the add whose branch is the probe
    output: Optional[fx.Node] = None     # rule "block delta": the probe is output - minus
    minus: Optional[fx.Node] = None

    @property
    def rule(self) -> str:
        return "residual branch" if self.residual is not None else "block delta"

    @property
    def node(self) -> fx.Node:
        """The node whose value (or layout, for a block delta) the probe has."""
        return self.residual.branch if self.residual is not None else self.output

    def describe(self) -> str:
        if self.residual is not None:
            return f"block {self.block}, residual branch {self.branch_index} ({self.node.name})"
        return (f"block {self.block}, its output delta {self.output.name} - {self.minus.name} "
                "(no residual branch inside the blocks)")


def _adds_by_block(region: Region) -> dict:
    """block path -> residual adds of the region's primary (largest) stream in that block.

    Adds whose branch is computed outside the region (Cosmos adds a learnable position
    embedding to the stream in every block) are no residual of the block: their "branch" is
    the same tensor at every step, and it is not an output of the region's piece."""
    by_block: dict = {}
    for add in region.streams[0].adds:
        if add.block is not None and add.branch in region.nodes:
            by_block.setdefault(add.block, []).append(add)
    return by_block


def choose_probe(regions: list, probe_block: Optional[Union[int, str]] = None, probe_branch: int = 0) -> Probe:
    if not regions:
        raise ValueError("no region to probe")
    if isinstance(probe_block, str):
        with_adds = [[b.path for b in region.blocks if b.path in adds]
                     for region, adds in ((region, _adds_by_block(region)) for region in regions)]
        found = find_named_block(probe_block, with_adds)
        if found is not None:
            r, j = found
            path = with_adds[r][j]
            return _pick(r, path, _adds_by_block(regions[r])[path], probe_branch)
        found = find_named_block(probe_block, [region.block_paths for region in regions])
        if found is not None:   # a block without residual branches: its output delta
            return _block_delta(found[0], regions[found[0]], probe_block)
        raise AdaCacheConfigError(f"probe_block={probe_block!r} names no cached block "
                                  f"(blocks: {[b for reg in regions for b in reg.block_paths]})")
    r = main_region(regions)
    region = regions[r]
    adds = _adds_by_block(region)
    paths = [b.path for b in region.blocks if b.path in adds]
    if not paths:
        return _block_delta(r, region, probe_block)
    path = paths[block_index(probe_block, len(paths))]
    return _pick(r, path, adds[path], probe_branch)


def probe_fallbacks(regions: list, probe: Probe) -> list:
    """Other probes of the same block, in order of preference: its other residual branches, then
    its output delta. Used when MoReg's frame axis does not reach the chosen probe (attention
    that gathers the valid tokens by a data-dependent mask, then pads them back)."""
    region = regions[probe.region]
    adds = _adds_by_block(region).get(probe.block, [])
    out = [Probe(probe.region, probe.block, i, add) for i, add in enumerate(adds) if i != probe.branch_index]
    if probe.residual is not None:
        try:
            out.append(_block_delta(probe.region, region, probe.block))
        except ValueError:
            pass
    return out


def main_region(regions: list) -> int:
    """The region the probe is taken from by default: the one with the most blocks (the first
    of those), so that a one-block text encoder before the main stack never holds the probe."""
    return max(range(len(regions)), key=lambda i: (len(regions[i].blocks), -i))


def _pick(region: int, path: str, block_adds: list, branch: int) -> Probe:
    if branch >= len(block_adds):
        raise AdaCacheConfigError(f"probe_branch={branch} but block {path} has {len(block_adds)} residual branches")
    return Probe(region, path, branch, block_adds[branch])


def _block_delta(r: int, region: Region, probe_block) -> Probe:
    """Rule "block delta": the chosen block's output minus its input on the primary stream."""
    stream = region.streams[0]
    shape = example_value(stream.output).shape
    blocks = region.blocks
    if isinstance(probe_block, str):
        found = find_named_block(probe_block, [region.block_paths])
        if found is None:
            raise AdaCacheConfigError(f"probe_block={probe_block!r} names no cached block "
                                      f"(blocks: {region.block_paths})")
        index = found[1]
    else:
        index = block_index(probe_block, len(blocks))
    block = blocks[index]
    inside = set(block.nodes)
    same = lambda n: isinstance(example_value(n), torch.Tensor) and sizes_equal(example_value(n).shape, shape)  # noqa: E731
    outs = [n for n in block.nodes if same(n) and any(u not in inside for u in n.users)]
    ins = list(dict.fromkeys(a for n in block.nodes for a in n.all_input_nodes
                             if a not in inside and same(a) and not is_parameter_placeholder(a) and a.op != "get_attr"))
    if len(ins) > 1:   # prefer what flows along the stream: an earlier block's value or the region input
        ins = [a for a in ins if a in region.nodes or a is stream.input] or ins
    if len(outs) != 1 or len(ins) != 1:
        raise ValueError(f"no probe: block {block.path} has no residual branch on the primary stream and no "
                         f"single output/input of the stream's shape ({len(outs)} outputs, {len(ins)} inputs); "
                         "set probe_block to another block")
    return Probe(r, block.path, 0, None, output=outs[0], minus=ins[0])

"""Choose the probe residual: the branch whose change across steps drives the schedule.

Default (as the official AdaCache code): a middle block's first residual branch, which
is its self-attention. ``probe_block`` picks another block by index (graph order over
the first region's blocks, negative from the end) or by module path; ``probe_branch``
picks another residual of that block (0: attention, then cross-attention / MLP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..config import AdaCacheConfigError
from .find_regions import Region, ResidualAdd


@dataclass
class Probe:
    region: int            # index of the region holding it
    block: str             # module path of the block
    branch_index: int
    residual: ResidualAdd

    @property
    def node(self):
        return self.residual.branch


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
        for r, region in enumerate(regions):
            adds = _adds_by_block(region)
            for path, block_adds in adds.items():
                if path == probe_block or path.endswith("." + probe_block) or path.endswith(probe_block):
                    return _pick(r, path, block_adds, probe_branch)
        raise AdaCacheConfigError(f"probe_block={probe_block!r} names no cached block "
                         f"(blocks: {[b for reg in regions for b in reg.block_paths]})")
    region = regions[0]
    adds = _adds_by_block(region)
    paths = [b.path for b in region.blocks if b.path in adds]
    if not paths:
        raise ValueError("the region's primary stream has no residual add inside a block")
    if probe_block is None:
        index = len(paths) // 2
    else:
        if not -len(paths) <= probe_block < len(paths):
            raise AdaCacheConfigError(f"probe_block={probe_block} is out of range for {len(paths)} blocks")
        index = probe_block
    path = paths[index]
    return _pick(0, path, adds[path], probe_branch)


def _pick(region: int, path: str, block_adds: list, branch: int) -> Probe:
    if branch >= len(block_adds):
        raise AdaCacheConfigError(f"probe_branch={branch} but block {path} has {len(block_adds)} residual branches")
    return Probe(region, path, branch, block_adds[branch])

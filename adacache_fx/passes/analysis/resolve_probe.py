"""Which block ``AdaCacheConfig.probe_block`` names: one resolver for the graph-level analysis
(``choose_probe``) and the block-list guard (``runtime/module_guard.py``).

``probe_block`` is a module path or the end of one at a dot (``"transformer_blocks.3"`` names
``transformer_blocks.3`` and ``model.transformer_blocks.3``, never ``single_transformer_blocks.3``),
an index over the blocks of the default region (negative from the end), or None (its middle block).
"""
from __future__ import annotations

from typing import Optional, Union

from ...errors import AdaCacheConfigError


def names_block(path: str, name: str) -> bool:
    """Whether module path ``path`` is the block ``name`` names: the path itself, or its end at a dot."""
    return path == name or path.endswith("." + name)


def find_named_block(name: str, paths: list) -> Optional[tuple]:
    """``(region, position)`` of the first block of ``paths`` (per region, block paths in order)
    that ``name`` names, with an exact path preferred; None when none does."""
    for match in (lambda p: p == name, lambda p: names_block(p, name)):
        for r, region in enumerate(paths):
            for j, path in enumerate(region):
                if match(path):
                    return r, j
    return None


def block_index(probe_block: Optional[int], count: int) -> int:
    """The middle block of ``count`` by default, else ``probe_block`` (negative from the end)."""
    if probe_block is None:
        return count // 2
    if not -count <= probe_block < count:
        raise AdaCacheConfigError(f"probe_block={probe_block} is out of range for {count} blocks")
    return probe_block % count


def resolve_probe_block(probe_block: Union[int, str, None], paths: list, default_region: int) -> tuple:
    """``(region, position)`` of the probe's block among ``paths`` (per region, its block paths):
    the named block, or an index (default: the middle) over ``default_region``'s blocks."""
    if isinstance(probe_block, str):
        found = find_named_block(probe_block, paths)
        if found is None:
            raise AdaCacheConfigError(f"probe_block={probe_block!r} names no cached block "
                                      f"(blocks: {[p for region in paths for p in region]})")
        return found
    return default_region, block_index(probe_block, len(paths[default_region]))

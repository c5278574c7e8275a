"""Analyse: find what can be cached in a Dynamo FX graph, without changing it.

``ANALYSIS_PASSES`` is the ordered pass list. Every pass has the signature
``pass_(analysis: GraphAnalysis) -> None``: it reads the fields its predecessors filled,
fills its own, and says what it did with ``analysis.note`` (kept in ``analysis.log`` and sent
to the ``adacache_fx`` logger at DEBUG level).
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist
import torch.fx as fx

from ...config import AdaCacheConfig
from ...errors import AdaCacheConfigError, AdaCacheWarning
from .choose_probe import Probe, choose_probe, probe_fallbacks
from .find_blocks import find_blocks
from .find_regions import find_regions
from .find_residual_chain import find_residual_chain
from .find_timestep import find_timestep
from .frame_layout import FrameLayout, find_video_inputs, infer_frame_layout
from .frame_layout.stops import shard_message
from .graph_nodes import describe_node, module_stack, user_placeholder_name
from .process_group import resolve_process_group, shard_problem
from .reasons import BLOCK_LEFT_UNCACHED, MOREG_OFF, NO_BLOCKS, NO_PROBE, Reason

logger = logging.getLogger("adacache_fx")
_LIST_ELEMENT = re.compile(r"^[\w.]*?\w+\.\d+")


_breaks_seen: dict = {}


def _last_graph_break() -> str:
    """The graph-break reasons Dynamo recorded since this was last asked (first line and hint
    of the newest one): Dynamo's counters are per process, so only new counts belong to the
    model being traced now."""
    from torch._dynamo.utils import counters

    if any(counters["graph_break"].get(r, 0) < n for r, n in _breaks_seen.items()):
        _breaks_seen.clear()   # the counters were cleared (torch._dynamo.reset())
    new = [r for r, n in counters["graph_break"].items() if n > _breaks_seen.get(r, 0)]
    _breaks_seen.clear()
    _breaks_seen.update(counters["graph_break"])
    if not new:
        return ""
    lines = [ln.strip() for ln in new[-1].splitlines() if ln.strip()]
    hint = next((ln for ln in lines if ln.startswith("Hint:")), "")
    return f" (Dynamo's graph-break reason: {lines[0]!r}{'; ' + hint if hint else ''})"


@dataclass
class GraphAnalysis:
    graph: fx.Graph
    config: AdaCacheConfig
    blocks: list = field(default_factory=list)
    regions: list = field(default_factory=list)
    timestep: Optional[fx.Node] = None
    probe: Optional[Probe] = None
    frame_layout: Optional[FrameLayout] = None
    packed_frames: Optional[int] = None   # frame count of packed video tokens (config.frames_arg, from the call)
    process_group: object = None           # the group the metric is reduced over (None: no collective)
    log: list = field(default_factory=list)
    reasons: list = field(default_factory=list)   # [Reason]: what the passes could not do, and why

    @property
    def cacheable(self) -> bool:
        return bool(self.regions) and self.probe is not None

    def why_uncacheable(self) -> str:
        """What stopped the pass, and what the user can do."""
        for kind in (NO_BLOCKS, BLOCK_LEFT_UNCACHED, NO_PROBE):
            found = self.reasons_of(kind)
            if found:
                if kind == BLOCK_LEFT_UNCACHED:
                    return ("blocks found but no cacheable region: " + "; ".join(str(r) for r in found)
                            + ". adacache_fx.explain(model, *inputs) shows the blocks and streams")
                return "; ".join(str(r) for r in found)
        return "nothing to cache"

    def reasons_of(self, kind: str) -> list:
        return [r for r in self.reasons if r.kind == kind]

    def add_reason(self, reason: Reason) -> None:
        self.reasons.append(reason)
        self.note(str(reason))

    def block_fragment(self) -> Optional[str]:
        """A module-list element (``transformer_blocks.3``, or inside a block's own resumed frame
        ``mlp.0``) this graph holds ops of: with no whole block, a fragment left by a graph break."""
        for node in self.graph.nodes:
            for path, _cls in module_stack(node):
                if _LIST_ELEMENT.search(path):
                    return _LIST_ELEMENT.search(path).group(0)
        return None

    def note(self, message: str) -> None:
        self.log.append(message)
        logger.debug("adacache: %s", message)

    def describe(self) -> str:
        lines = []
        lines.append(f"blocks: {len(self.blocks)}" + (f" ({self.blocks[0].cls_name}, lists: "
                     f"{sorted({b.list_path for b in self.blocks})})" if self.blocks else ""))
        for r, region in enumerate(self.regions):
            paths = region.block_paths
            span = paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
            lines.append(f"region {r}: {len(paths)} blocks ({span}), {len(region.nodes)} nodes")
            for s, stream in enumerate(region.streams):
                lines.append(f"  stream {s} ({stream.kind}): {stream.input.name} -> {stream.output.name} shape "
                             f"{tuple(stream.shape)}, {len(stream.adds)} residual adds")
        ts = user_placeholder_name(self.timestep) if self.timestep is not None else None
        lines.append(f"timestep input: {ts!r}" if ts else "timestep input: none found (each call is a step)")
        if self.probe is not None:
            lines.append(f"probe ({self.probe.rule}): {self.probe.describe()}")
        else:
            lines.append("probe: none")
        off = self.reasons_of(MOREG_OFF)
        lines.append(f"MoReg frame layout: {self.frame_layout.describe()}" if self.frame_layout
                     else f"MoReg frame layout: none ({off[-1] if off else 'not inferred'})")
        return "\n".join(lines)


def _pass_find_blocks(a: GraphAnalysis) -> None:
    a.blocks = find_blocks(a.graph)
    a.note(f"find_blocks: {len(a.blocks)} blocks")
    for block in a.blocks:
        if block.wrapper_nodes:
            a.note(f"find_blocks: {len(block.wrapper_nodes)} ops of {block.path} were traced in a hook or wrapper "
                   f"around {block.cls_name}.forward, not in it, and are left outside the block: "
                   + ", ".join(describe_node(n) for n in block.wrapper_nodes[:3]))
    if not a.blocks:
        a.blocks = find_residual_chain(a.graph)
        a.note(f"find_residual_chain: no block list in the module metadata; {len(a.blocks)} residual "
               f"branches found from the graph's structure")
    if not a.blocks:
        fragment = a.block_fragment()
        a.add_reason(Reason(
            NO_BLOCKS, "no block stack found: no module list of blocks, no repeated module calls doing block work "
            "(a residual add and two matmuls each) and no chain of residual adds in this graph."
            + (f" It holds ops of {fragment} but no whole block." if fragment else ""),
            todo="If the model breaks Dynamo's graph inside its blocks" + _last_graph_break() + ", the stack "
            "reaches the backend in fragments: compile with adacache_fx.compile_model(model, config), "
            "which captures .item(), .tolist() and nonzero into the graph and, where a Python branch or loop on "
            "a tensor's value still breaks it inside the blocks, guards the block lists at their calls (its "
            "default block_guard='auto' finds out; block_guard='modules' forces it); "
            "torch._dynamo.explain(model)(*inputs) lists the breaks"))


def _pass_find_regions(a: GraphAnalysis) -> None:
    left = []
    a.regions = find_regions(a.graph, a.blocks, left)
    for reason in left:
        a.add_reason(reason)
    if a.blocks and not a.regions and not left:
        a.add_reason(Reason(BLOCK_LEFT_UNCACHED, "no chain of blocks makes a region"))
    a.note(f"find_regions: {len(a.regions)} regions, streams per region "
           f"{[len(r.streams) for r in a.regions]}")


def _pass_find_timestep(a: GraphAnalysis) -> None:
    a.timestep = find_timestep(a.graph, a.config.timestep_arg)
    a.note(f"find_timestep: {a.timestep.name if a.timestep is not None else None}")


def _pass_choose_probe(a: GraphAnalysis) -> None:
    if a.regions:
        try:
            a.probe = choose_probe(a.regions, a.config.probe_block, a.config.probe_branch)
        except AdaCacheConfigError:
            raise   # the user's probe setting does not fit the model: say so
        except ValueError as exc:   # no usable probe: the graph runs uncached, with this reason
            a.add_reason(Reason(NO_PROBE, f"no probe: {exc}".replace("no probe: no probe:", "no probe:")))
            return
        a.note(f"choose_probe ({a.probe.rule}): {a.probe.describe()}")


def _pass_infer_frame_layout(a: GraphAnalysis) -> None:
    if a.probe is None:
        return
    if a.config.frames_arg is not None and a.packed_frames is None and not find_video_inputs(a.graph):
        raise AdaCacheConfigError(
            f"adacache: frames_arg={a.config.frames_arg!r} is read from the model's call arguments, which only "
            "adacache_fx.compile_model (and explain) see: compile the model with compile_model(model, config)")
    streams = [s.input for region in a.regions for s in region.streams]
    found: list = []
    a.frame_layout = infer_frame_layout(a.graph, a.probe.node, a.config.video_frame_dim, found, a.packed_frames,
                                        streams)
    is_video = bool(find_video_inputs(a.graph)) or a.packed_frames is not None
    if a.frame_layout is None and is_video and a.config.probe_branch == 0:
        # A video model whose frame axis does not reach the default probe: the same block's
        # other residual branches, then its output delta, keep MoReg on.
        for probe in probe_fallbacks(a.regions, a.probe):
            layout = infer_frame_layout(a.graph, probe.node, a.config.video_frame_dim, packed_frames=a.packed_frames,
                                        streams=streams)
            if layout is not None:
                a.note(f"infer_frame_layout: the frame axis does not reach {a.probe.describe()}; "
                       f"probe ({probe.rule}) {probe.describe()} instead, which it reaches")
                a.probe, a.frame_layout = probe, layout
                break
    for reason in found if a.frame_layout is None else [r for r in found if r.kind != MOREG_OFF]:
        a.add_reason(reason)
    a.note(f"infer_frame_layout: {a.frame_layout.describe() if a.frame_layout else None}")
    if a.frame_layout is None and is_video:
        _say_why_moreg_is_off(a)


def _say_why_moreg_is_off(a: GraphAnalysis) -> None:
    """A video model whose frame axis is lost at a shard (context parallelism): MoReg is off,
    and the user is told so (log, explain, and a warning), not left with silently other decisions."""
    videos = find_video_inputs(a.graph)
    if not videos:
        return
    dim = a.config.video_frame_dim % 5 if a.config.video_frame_dim is not None else 2
    message = shard_message(a.graph, videos[0], dim, a.probe.node, user_placeholder_name(videos[0]))
    if message is None:
        return
    a.add_reason(Reason(MOREG_OFF, f"MoReg off: {message}"))
    if a.config.moreg:   # the user asked for MoReg and does not get it
        warnings.warn(f"adacache: {message}", AdaCacheWarning, stacklevel=2)


def _pass_resolve_process_group(a: GraphAnalysis) -> None:
    """The metric's process group (config.process_group; "auto": the model's own collectives),
    and whether a sharded frame axis can use it: every shard on its own rank of the group."""
    a.process_group = resolve_process_group(a.config.process_group, a.graph)
    if a.process_group is not None:
        a.note(f"resolve_process_group: the metric is reduced over {dist.get_world_size(a.process_group)} ranks")
    axis = a.frame_layout.probe_axis if a.frame_layout is not None else None
    problem = shard_problem(axis.shard, a.process_group, axis.frames, a.config.moreg_stride) if axis else None
    if problem is None:
        return
    a.frame_layout = None
    a.add_reason(Reason(MOREG_OFF, f"MoReg off: {problem}"))
    if a.config.moreg:
        warnings.warn(f"adacache: MoReg off: {problem}", AdaCacheWarning, stacklevel=2)


# The ordered pass list: each pass may rely on the fields its predecessors filled.
ANALYSIS_PASSES = (
    _pass_find_blocks,
    _pass_find_regions,
    _pass_find_timestep,
    _pass_choose_probe,
    _pass_infer_frame_layout,
    _pass_resolve_process_group,
)


def analyze(graph: fx.Graph, config: AdaCacheConfig, packed_frames: Optional[int] = None) -> GraphAnalysis:
    """Run ``ANALYSIS_PASSES`` on ``graph``. ``packed_frames``: the frame count the call's
    ``config.frames_arg`` argument gives (Dynamo bakes Python ints into the graph as constants);
    None: ``config.packed_frames``."""
    if packed_frames is None:
        packed_frames = config.packed_frames
    analysis = GraphAnalysis(graph=graph, config=config, packed_frames=packed_frames)
    for run_pass in ANALYSIS_PASSES:
        run_pass(analysis)
    return analysis

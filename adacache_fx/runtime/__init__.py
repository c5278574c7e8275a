"""Guard: the runtime of rewritten graphs. The graph-level guard (``cached_graph``, with its
per-sample calls) and the block-list guard (``module_guard``) keep their caches in a
``branch_store``; a schedule is a ``step_clock`` and a decision policy (``policies/``); what a
reused step adds comes from a forecaster (``forecasters/``); ``collectives`` keeps ranks in step."""
from .cached_graph import CachedGraph, GraphLayout
from .policies import StepMetric, codebook_rate
from .scheduler import AdaCacheScheduler
from .state import RuntimeState
from .step_clock import StepClock
from .timestep_source import TimestepSource

__all__ = ["AdaCacheScheduler", "CachedGraph", "GraphLayout", "RuntimeState", "StepClock", "StepMetric",
           "TimestepSource", "codebook_rate"]

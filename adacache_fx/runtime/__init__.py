"""Guard: the runtime of rewritten graphs (cached graph, scheduler, step clock, distributed)."""
from .cached_graph import CachedGraph, GraphLayout
from ..errors import AdaCacheSyncWarning
from .clock import StepClock
from .scheduler import AdaCacheScheduler, StepMetric, codebook_rate
from .state import RuntimeState

__all__ = ["AdaCacheScheduler", "AdaCacheSyncWarning", "CachedGraph", "GraphLayout", "RuntimeState",
           "StepClock", "StepMetric", "codebook_rate"]

"""Graph analysis and rewrite passes (one per file); ``analyze.ANALYSIS_PASSES`` orders them."""
from .analyze import ANALYSIS_PASSES, GraphAnalysis, analyze

__all__ = ["ANALYSIS_PASSES", "GraphAnalysis", "analyze"]

"""adacache-fx: AdaCache + MoReg as a torch.compile backend for any Diffusion Transformer.

    from adacache_fx import AdaCacheConfig, adacache_backend
    backend = adacache_backend(AdaCacheConfig.fast(num_steps=30))
    model = torch.compile(model, backend=backend)
"""
from .backend import AdaCacheBackend, AdaCacheWarning, adacache_backend, default_backend
from .config import AdaCacheConfig, AdaCacheConfigError
from .explain import Explanation, explain
from .report import Report
from .scheduler import AdaCacheScheduler, StepMetric, codebook_rate

__all__ = [
    "AdaCacheBackend", "AdaCacheConfig", "AdaCacheConfigError", "AdaCacheScheduler", "AdaCacheWarning", "Explanation",
    "Report", "StepMetric", "adacache_backend", "codebook_rate", "default_backend", "explain",
]
__version__ = "0.1.0"

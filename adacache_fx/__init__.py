"""adacache-fx: AdaCache + MoReg as a torch.compile backend for any Diffusion Transformer.

    from adacache_fx import AdaCacheConfig, adacache_backend
    backend = adacache_backend(AdaCacheConfig.fast(num_steps=30))
    model = torch.compile(model, backend=backend)

    # or, in place, with .item() / .tolist() / nonzero captured into the graph (models that
    # would otherwise break Dynamo's graph inside their blocks):
    backend = compile_model(model, AdaCacheConfig.fast(num_steps=30))
"""
from ._compat import check_torch

check_torch()

from .backend import AdaCacheBackend, adacache_backend, default_backend  # noqa: E402
from .calibration import CalibrationResult, calibrate  # noqa: E402
from .compile_model import compile_model, data_dependent_capture  # noqa: E402
from .config import AdaCacheConfig  # noqa: E402
from .errors import AdaCacheConfigError, AdaCacheSyncWarning, AdaCacheWarning  # noqa: E402
from .explain import Explanation, explain  # noqa: E402
from .lifecycle import disable  # noqa: E402
from .report import Report  # noqa: E402
from .runtime import AdaCacheScheduler, StepMetric, codebook_rate  # noqa: E402

__all__ = [
    "AdaCacheBackend", "AdaCacheConfig", "CalibrationResult", "calibrate", "AdaCacheConfigError", "AdaCacheScheduler", "AdaCacheSyncWarning",
    "AdaCacheWarning", "Explanation", "Report", "StepMetric", "adacache_backend", "codebook_rate", "compile_model",
    "data_dependent_capture", "default_backend", "disable", "explain",
]
__version__ = "0.1.0"

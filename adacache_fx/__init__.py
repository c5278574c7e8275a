"""adacache-fx: AdaCache + MoReg as a torch.compile backend for any Diffusion Transformer.

    import adacache_fx
    from adacache_fx import AdaCacheConfig
    adacache_fx.enable_cache(pipe, AdaCacheConfig.fast(num_steps=30))   # a diffusers pipeline, or any nn.Module
    adacache_fx.summary(pipe)
    adacache_fx.disable_cache(pipe)

    # or as a torch.compile backend in your own sampling loop:
    backend = adacache_backend(AdaCacheConfig.fast(num_steps=30))
    model = torch.compile(model, backend=backend)
    with backend.generation(num_steps=30):
        ...
"""
from ._compat import check_torch

check_torch()

from .backend import AdaCacheBackend, adacache_backend, default_backend  # noqa: E402
from .calibration import CalibrationResult, calibrate  # noqa: E402
from .compile_model import compile_model, data_dependent_capture  # noqa: E402
from .config import AdaCacheConfig  # noqa: E402
from .errors import AdaCacheConfigError, AdaCacheSyncWarning, AdaCacheWarning  # noqa: E402
from .explain import Explanation, explain  # noqa: E402
from .lifecycle import disable, disable_cache, enable_cache, summary  # noqa: E402
from .report import Report  # noqa: E402
from .runtime import StepMetric  # noqa: E402

__all__ = [
    "AdaCacheBackend", "AdaCacheConfig", "AdaCacheConfigError", "AdaCacheSyncWarning", "AdaCacheWarning",
    "CalibrationResult", "Explanation", "Report", "StepMetric", "adacache_backend", "calibrate", "compile_model",
    "data_dependent_capture", "default_backend", "disable", "disable_cache", "enable_cache", "explain", "summary",
]
__version__ = "0.1.0"

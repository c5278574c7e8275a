"""Decision policies: per step, compute the cached regions or reuse them. ``base.Policy`` keeps
the schedule contract; each policy is one module registered by name (``registry``), chosen by
``AdaCacheConfig(policy=...)``. Built in: ``"adacache"`` (codebook + MoReg)."""
from . import adacache  # noqa: F401 - registers "adacache"
from .adacache import AdaCachePolicy, codebook_rate, motion_score
from .base import PendingMetric, Policy, StepMetric
from .registry import make_policy, register_policy, registered_policies

__all__ = ["AdaCachePolicy", "PendingMetric", "Policy", "StepMetric", "codebook_rate", "make_policy", "motion_score",
           "register_policy", "registered_policies"]

"""Decision policies by name: ``AdaCacheConfig(policy=name)`` chooses one.

    @register_policy("my_rule")
    class MyRule(Policy):
        def measure(self, pending, sums, num_steps): ...

One file per policy; the runtime never names one.
"""
from __future__ import annotations

from ..registry import Registry

POLICIES = Registry("policy", "policy")
register_policy = POLICIES.register
registered_policies = POLICIES.names


def make_policy(config):
    """A fresh policy of ``config.policy``."""
    return POLICIES.get(config.policy)(config)

"""Decision policies by name: ``AdaCacheConfig(policy=name)`` chooses one.

    @register_policy("my_rule")
    class MyRule(Policy):
        def measure(self, pending, sums, num_steps): ...

One file per policy; the runtime never names one.
"""
from __future__ import annotations

from ...errors import AdaCacheConfigError

_POLICIES: dict = {}


def register_policy(name: str):
    """Class decorator: register a :class:`~adacache_fx.runtime.policies.base.Policy` subclass."""
    def register(cls):
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise ValueError(f"a policy named {name!r} is already registered ({_POLICIES[name].__name__})")
        cls.name = name
        _POLICIES[name] = cls
        return cls
    return register


def registered_policies() -> list:
    return sorted(_POLICIES)


def make_policy(config):
    """A fresh policy of ``config.policy``."""
    cls = _POLICIES.get(config.policy)
    if cls is None:
        raise AdaCacheConfigError(f"policy={config.policy!r} is not a registered policy "
                                  f"(registered: {registered_policies()})")
    return cls(config)

"""A registry of classes by name, one per extension point (decision policies, forecasters): a
config field names the class, and the runtime never names one."""
from __future__ import annotations

from ..errors import AdaCacheConfigError


class Registry:
    def __init__(self, what: str, field: str):
        self.what = what          # "policy", "forecaster"
        self.field = field        # the AdaCacheConfig field that names one
        self.classes: dict = {}

    def register(self, name: str):
        """Class decorator: register the class under ``name`` (its ``name`` attribute is set)."""
        def register(cls):
            if name in self.classes and self.classes[name] is not cls:
                raise ValueError(f"a {self.what} named {name!r} is already registered ({self.classes[name].__name__})")
            cls.name = name
            self.classes[name] = cls
            return cls
        return register

    def unregister(self, name: str) -> None:
        self.classes.pop(name, None)

    def names(self) -> list:
        return sorted(self.classes)

    def get(self, name: str):
        """The class registered as ``name``; ``AdaCacheConfigError`` naming the config field otherwise."""
        cls = self.classes.get(name)
        if cls is None:
            raise AdaCacheConfigError(f"{self.field}={name!r} is not a registered {self.what} (registered: {self.names()})")
        return cls

"""Methods: each a small object that prepares the model, encodes examples and defines the loss.

The registry maps a lower-case name to the method class. Everything a method does not define
(batching, precision, optimizer, schedule, scoring) is the engine's, shared by all methods.
"""

from __future__ import annotations

from ..errors import FewtuneError, unknown
from .base import Method, RunContext

REGISTRY: dict[str, type[Method]] = {}


def register(cls):
    name = cls.name
    if name != name.lower() or not name.isidentifier():
        raise ValueError(f"method name {name!r} must be a lower-case identifier")
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is registered twice")
    REGISTRY[name] = cls
    return cls


def get_method(name: str, options: dict | None = None) -> Method:
    if name not in REGISTRY:
        raise unknown("method", name, REGISTRY)
    return REGISTRY[name](options or {})


from . import icl, ft, pbft, adaptive, lora, cd, peft  # noqa: E402,F401  (registration)

__all__ = ["Method", "RunContext", "REGISTRY", "get_method", "register", "FewtuneError"]

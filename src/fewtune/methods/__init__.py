"""Methods: each a small object that prepares the model, encodes examples and defines the loss.

The registry maps a lower-case name to the method class; it is the one list of methods: config validation, the
CLI's per-method flags (declared by each option, `base.option`) and `fewtune ls methods` read it, so a new
method is one file here (imported below) plus its test case. Everything a method does not define
(batching, precision, optimizer, schedule, scoring) is the engine's, shared by all methods.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field

from ..errors import FewtuneError, unknown
from .base import Flag, Method, RunContext

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


@dataclass
class OptionFlag:
    """One CLI flag and the option it sets in each method that declares it (--lora-r: lora's r, cd's lora_r)."""
    flag: Flag
    fields: dict = field(default_factory=dict)  # method name -> option name, in registry order
    helps: dict = field(default_factory=dict)   # method name -> "what it does [default]"

    @property
    def dest(self) -> str:
        return self.flag.flag.lstrip("-").replace("-", "_")

    @property
    def help(self) -> str:
        return "; ".join(f"{m}: {h}" for m, h in self.helps.items())


def option_flags() -> dict[str, OptionFlag]:
    """{flag: OptionFlag} over every registered method's options. A flag shared by methods must mean the same kind
    of value in each (checked: a clash is a programming error, raised at first use)."""
    flags: dict[str, OptionFlag] = {}
    for name, cls in REGISTRY.items():
        for f in dataclasses.fields(cls.Options):
            flag = f.metadata.get("flag")
            if flag is None:
                continue
            entry = flags.setdefault(flag.flag, OptionFlag(flag))
            if (entry.flag.kind, entry.flag.split, entry.flag.key_value) != (flag.kind, flag.split, flag.key_value):
                raise ValueError(f"{flag.flag}: method {name!r} declares it with another kind of value than "
                                 f"{', '.join(entry.fields)}")
            entry.fields[name] = f.name
            default = f.default if f.default is not dataclasses.MISSING else None
            entry.helps[name] = flag.help + (f" [{default}]" if default not in (None, "", []) else "")
    return flags


# Registration: the study's methods first, in the order listings, help and errors name them; then every other
# module of this folder (base and layers register nothing), so a new method is one new file.
from . import icl, ft, pbft, adaptive, lora, cd, peft  # noqa: E402,F401
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "OptionFlag", "RunContext", "REGISTRY", "get_method", "option_flags", "register", "FewtuneError"]

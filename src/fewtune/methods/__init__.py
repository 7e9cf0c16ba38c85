"""Methods: each a small object that prepares the model, encodes examples and defines the loss.

A method is one file of this folder, and its file name is its name: `methods/ft.py` is the method `ft`, and a copy
under another name is another method that behaves the same. The file holds everything the method needs: its
options (each with its CLI flag, `base.option`), its budgets (`defaults`, and `presets` for `--preset quick`), its
objective (`base.ObjectiveOptions`) and its hooks. Everything a method does not define (batching, precision,
optimizer, schedule, scoring) is the engine's, shared by all methods.

The registry maps each name to "fewtune.methods.<name>" and imports a method's module only when it is used
(lm-eval's lazy Registry: `fewtune report` or `results` never import torch through it). Config validation, the
CLI's per-method flags and `fewtune ls methods` read it: it is the one list of methods.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import FewtuneError, unknown

# The study's methods first, in the order listings, help and errors name them; then every other file of this folder.
STUDY_ORDER = ("icl", "ft", "pbft", "adaptive", "lora", "cd", "peft")
HELPERS = ("base", "layers")  # modules of this folder that are not methods


class Registry(Mapping):
    """name -> the method's class, each loaded on first use from its "module" string (the class the module defines
    that subclasses Method). Iterating gives the names without importing anything."""

    def __init__(self, entries: dict[str, str]):
        self.entries = entries
        self._loaded: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        if name not in self._loaded:
            self._loaded[name] = load_method_class(name, self.entries[name])
        return self._loaded[name]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries


def load_method_class(name: str, module_name: str) -> type:
    """The one Method subclass defined in `module_name`, named after its file."""
    from .base import Method
    module = importlib.import_module(module_name)
    defined = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, Method) and v.__module__ == module.__name__]
    if len(defined) != 1:
        raise ValueError(f"{module_name} must define exactly one Method subclass, found "
                         f"{', '.join(c.__name__ for c in defined) or 'none'}")
    cls = defined[0]
    cls.name = name  # the file's name, whatever the class says: a copied file is a method of its own
    return cls


def discover() -> dict[str, str]:
    """{name: module} for every method file of this folder, without importing any."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if m.name not in HELPERS and not m.name.startswith("_")]
    for name in names:
        if name != name.lower() or not name.isidentifier():
            raise ValueError(f"method file {name!r}.py: a method's name must be a lower-case identifier")
    ordered = [n for n in STUDY_ORDER if n in names] + sorted(n for n in names if n not in STUDY_ORDER)
    return {name: f"{__name__}.{name}" for name in ordered}


REGISTRY = Registry(discover())


def get_method(name: str, options: dict | None = None):
    if name not in REGISTRY:
        raise unknown("method", name, REGISTRY)
    return REGISTRY[name](options or {})


def seed_free(config) -> bool:
    """Whether a run's predictions cannot depend on its data seed, as its method says from its options and config
    (Method.seed_free: icl with 0 shots). Imports the method's module on first use."""
    return bool(get_method(config.method, config.method_options).seed_free(config))


@dataclass
class OptionFlag:
    """One CLI flag and the option it sets in each method that declares it (--lora-r: lora's r, cd's lora_r)."""
    flag: object                                # base.Flag
    fields: dict = field(default_factory=dict)  # method name -> option name, in registry order
    helps: dict = field(default_factory=dict)   # method name -> "what it does [default]"

    @property
    def dest(self) -> str:
        return self.flag.flag.lstrip("-").replace("-", "_")

    @property
    def help(self) -> str:
        return "; ".join(f"{m}: {h}" for m, h in self.helps.items())


def option_flags() -> dict[str, OptionFlag]:
    """{flag: OptionFlag} over every registered method's options (imports every method). A flag shared by methods
    must mean the same kind of value in each (checked: a clash is a programming error, raised at first use)."""
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


def __getattr__(name: str):
    # the interface, for `from fewtune.methods import Method, RunContext`: base imports torch, so only on use
    if name in ("Method", "RunContext", "Options", "ObjectiveOptions", "option", "Flag"):
        from . import base
        return getattr(base, name)
    raise AttributeError(f"module 'fewtune.methods' has no attribute {name!r}")


__all__ = ["Method", "OptionFlag", "RunContext", "REGISTRY", "get_method", "option_flags", "seed_free", "FewtuneError"]

"""The typed configuration of one run, validated with errors that name the field.

A run is fully described by a `RunConfig`; its `hash()` identifies the run in the results database
(the same config hashes the same on every machine), and `to_dict()` is stored with every result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import FewtuneError, did_you_mean, unknown
from .methods import REGISTRY

DTYPES = ("auto", "fp32", "bf16")
MAX_COUNT = 10**9        # shots, epochs, sizes: more is a typo, and would overflow SQLite/numpy/torch integers later
MAX_SEED = 2**32 - 1     # numpy and torch both take seeds in [0, 2**32)


SCORING_ROWS = 16  # rows per scoring batch unless eval_batch_size says otherwise (a CPU gains little past 16)

@dataclass
class RunConfig:
    task: str = "mnli"                  # built-in name or path to a task file
    method: str = "icl"
    model: str = "smollm2-135m"         # bundled name, local folder or Hub id
    shots: int = 16                     # training examples (icl: demonstrations)
    seed: int = 0                       # data seed: the few-shot sample and the demonstration order
    train_seed: int | None = None       # initialisation/shuffling seed; defaults to `seed`
    pattern: int = 0                    # index into the task's patterns
    balanced: bool = True               # class-balanced sample (False: uniform)
    eval_limit: int | None = None       # per evaluation split; None = all (stratified, fixed seed)
    eval_splits: list[str] | None = None  # default: the task's in-domain + out-of-domain splits
    data_root: str | None = None
    data_source: str = "auto"           # auto | local | hub
    # training (ignored by icl); None = the method's default (the study's GPU budgets, docs/methods.md)
    epochs: int | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None  # gradient accumulation: batch_size / micro_batch_size steps
    lr: float | None = None
    weight_decay: float | None = None
    warmup_ratio: float | None = None
    max_grad_norm: float = 1.0
    max_length: int = 256
    eval_batch_size: int | None = None  # rows per scoring batch; None: a token budget on CUDA, 16 rows elsewhere
    dtype: str = "auto"                 # auto (bf16 autocast where the CPU/GPU supports it) | fp32 | bf16
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    method_options: dict = field(default_factory=dict)  # e.g. {"train_layers": 2, "objective": "pbft"}
    preset: str | None = None
    trust_remote_code: bool = False
    allow_unsafe_weights: bool = False
    # LM loss on a held-out general text before/after adaptation (methods that keep the LM head; retention.py):
    # "mnli-premises" (100 MNLI dev_matched premises from the data root; "mnli-premises:N" for N), a UTF-8 file
    # (one sentence a line), or "off"
    retention: str = "mnli-premises"

    def __post_init__(self):
        if self.method not in REGISTRY:  # the methods registry is the one list of methods
            raise FewtuneError(f"Unknown method '{self.method}'.{did_you_mean(self.method, list(REGISTRY))} "
                               f"Known: {', '.join(REGISTRY)}.")
        for name in ("task", "model", "method", "data_source", "dtype", "device"):
            if not isinstance(getattr(self, name), str):
                raise FewtuneError(f"Config field '{name}' must be a string, got {getattr(self, name)!r:.60}.")
        if not isinstance(self.retention, str) or not self.retention.strip():
            raise FewtuneError(f"Config field 'retention' must be \"mnli-premises\", a text file or \"off\", got {self.retention!r:.60}.")
        for name in ("data_root", "preset"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise FewtuneError(f"Config field '{name}' must be a string, got {getattr(self, name)!r:.60}.")
        for name in ("balanced", "trust_remote_code", "allow_unsafe_weights"):  # "false" is truthy: only true/false
            if not isinstance(getattr(self, name), bool):
                raise FewtuneError(f"Config field '{name}' must be true or false, got {getattr(self, name)!r:.60}.")
        for name in ("shots", "seed", "pattern", "max_length", "eval_batch_size"):
            value = getattr(self, name)
            if value is None and name == "eval_batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise FewtuneError(f"Config field '{name}' must be an integer, got {value!r:.60}.")
        for name in ("seed", "train_seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED):
                raise FewtuneError(f"Config field '{name}' must be an integer ≥ 0 and at most {MAX_SEED}, got {value!r:.60}.")
        if self.shots < 0:
            raise FewtuneError(f"Config field 'shots' must be ≥ 0, got {self.shots}.")
        for name in ("shots", "pattern", "max_length", "eval_batch_size"):
            if (getattr(self, name) or 0) > MAX_COUNT:
                raise FewtuneError(f"Config field '{name}' must be at most {MAX_COUNT}, got {getattr(self, name)}.")
        if self.pattern < 0:
            raise FewtuneError(f"Config field 'pattern' must be ≥ 0, got {self.pattern}.")
        if self.shots == 0 and REGISTRY[self.method].trains:
            zero_shot = ", ".join(name for name, cls in REGISTRY.items() if not cls.trains)
            raise FewtuneError(f"Method '{self.method}' trains and needs --shots ≥ 1 (only {zero_shot} runs zero-shot).")
        for name in ("epochs", "batch_size", "micro_batch_size", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_COUNT):
                raise FewtuneError(f"Config field '{name}' must be a positive integer, at most {MAX_COUNT}, got {value!r:.60}.")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value) or value < 0):
                raise FewtuneError(f"Config field '{name}' must be a non-negative number, got {value!r:.60}.")
        if self.lr == 0 and REGISTRY[self.method].trains:  # zero steps' worth of change, stored as if it were a result
            raise FewtuneError(f"Config field 'lr' must be > 0 for method '{self.method}' (it trains); got 0.")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:  # here, not after the model has loaded
            raise FewtuneError(f"Config field 'eval_batch_size' must be ≥ 1, got {self.eval_batch_size}.")
        if self.warmup_ratio is not None and self.warmup_ratio > 1:
            raise FewtuneError(f"Config field 'warmup_ratio' must be in [0, 1], got {self.warmup_ratio}.")
        if self.max_length < 8:
            raise FewtuneError(f"Config field 'max_length' must be ≥ 8, got {self.max_length}.")
        if self.dtype not in DTYPES:
            raise FewtuneError(f"Config field 'dtype' must be one of {', '.join(DTYPES)} (never fp16 on CPU), got {self.dtype!r}.")
        if self.data_source not in ("auto", "local", "hub"):
            raise FewtuneError(f"Config field 'data_source' must be auto, local or hub, got {self.data_source!r}.")
        if self.preset is not None:
            from .hyperparameters import PRESETS
            if self.preset not in PRESETS:  # before a grid's dry run passes, not in every cell at run time
                raise unknown("preset", self.preset, PRESETS)
        if not isinstance(self.method_options, dict):
            raise FewtuneError("Config field 'method_options' must be a table/dict.")
        if self.eval_splits is not None and (not isinstance(self.eval_splits, list)
                                             or not all(isinstance(x, str) for x in self.eval_splits)):
            raise FewtuneError(f"Config field 'eval_splits' must be a list of split names, got {self.eval_splits!r:.60}.")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise FewtuneError(f"{where}: unknown field '{key}'.{did_you_mean(key, sorted(known))}")
        return cls(**d)

    @property
    def scoring_rows(self) -> int:
        """Rows per scoring batch: `eval_batch_size` as given, else 16 (CUDA then sizes batches by a token budget)."""
        return self.eval_batch_size or SCORING_ROWS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """Everything that changes the run's result (fewtune.identity): normalised options, the task's content,
        the data's provenance; not where it runs."""
        from .identity import identity
        return identity(self)

    def hash(self) -> str:
        """Stable id of what the run computes: sha256 of `identity()` (sorted JSON), 16 hex digits."""
        from .identity import run_hash
        return run_hash(self)

"""Any PEFT method through `peft`: IA3, LoHa, LoKr, VeRA, OFT/BOFT, LN tuning, prompt/prefix tuning, ... (the types of the installed peft).

Options: `peft_type` (a `peft.PeftType`, case-insensitive) and any field of that type's config class, plus
`objective` pbft (verbalizer over the LM head) or ft (a new head: `task_type=SEQ_CLS` puts it in
`modules_to_save`, so it trains and is saved with the adapter, as for lora). The valid types and fields are
read from peft itself (`PEFT_TYPE_TO_CONFIG_MAPPING`, `dataclasses.fields`), so a newer peft offers more.
Target modules default to peft's own per-architecture table, else every Linear inside attention (lora's rule).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

import torch

from ..errors import FewtuneError, did_you_mean, one_line
from .base import Method, ObjectiveOptions, option
from .lora import ADAPTER_DEFAULTS, attention_linears

# Config fields fewtune sets itself: the type and task come from peft_type/objective, the rest from the run.
RESERVED = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")
# Defaults for fields that peft leaves unset although the type cannot run without them.
TYPE_DEFAULTS = {"PROMPT_TUNING": {"num_virtual_tokens": 16}, "P_TUNING": {"num_virtual_tokens": 16},
                 "PREFIX_TUNING": {"num_virtual_tokens": 16}}
# Fields a type needs from the user (peft's defaults for them do not run).
REQUIRED = {"TRAINABLE_TOKENS": ("token_indices",), "CPT": ("cpt_token_ids",),
            "ADAPTION_PROMPT": ("adapter_len", "adapter_layers"), "CARTRIDGE": ("num_virtual_tokens",)}
# Types that need more than one training loop and one scorer can give them.
UNSUPPORTED = {
    "ADALORA": "its rank allocation needs a call to update_and_allocate() after every optimizer step, which fewtune's one training loop does not make",
    "XLORA": "it mixes LoRA adapters trained before; train those with --method lora",
    "POLY": "it routes by task ids per example, which a single-task run does not have",
    "MULTITASK_PROMPT_TUNING": "it needs task ids per example, which a single-task run does not have",
}
# Learning rates by kind of type (the study's LoRA budget for the rest); a preset or --lr overrides them.
# VeRA trains only two scaling vectors per layer over frozen random matrices: its paper uses ~10x LoRA's rate.
LR = {"prompt": 3e-2, "IA3": 3e-3, "VERA": 4e-3}
# Under --preset quick (5 epochs at batch 8), by the same kinds; lora's quick rate for every other type.
QUICK_LR = {"prompt": 3e-2, "IA3": 1e-2, "VERA": 1e-2}


def peft_types() -> dict:
    """{type name: config class} of the installed peft."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    return {(k.value if hasattr(k, "value") else str(k)): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def config_fields(cls) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in RESERVED)


def normalise_type(name) -> str:
    known = peft_types()
    if name is None or name == "":
        raise FewtuneError(f"peft: needs a peft_type (--peft-type), one of: {', '.join(sorted(known))}.")
    if not isinstance(name, str):
        raise FewtuneError(f"peft: peft_type must be a string, got {name!r:.60}.")
    key = name.strip().upper().replace("-", "_")
    if key not in known:
        raise FewtuneError(f"peft: unknown peft_type '{name}'.{did_you_mean(key, list(known))} "
                           f"Known (peft {__import__('peft').__version__}): {', '.join(sorted(known))}.")
    return key


def is_prompt_learning(cls) -> bool:
    from peft.config import PromptLearningConfig
    return issubclass(cls, PromptLearningConfig)


def field_types(cls) -> dict:
    """{field: type hint} of a peft config class ({} where peft's annotations cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a forward reference peft cannot resolve here: leave the values to peft
        return {}


def matches(value, hint) -> bool:
    """Whether `value` (from TOML) can be a value of the type hint. Only what can be judged is refused: builtin
    scalars, lists, dicts and their unions; Literal as the types of its values (peft's literals include patterns
    such as 'pissa_niter_[number of iters]'); anything else (classes, callables) is left to peft."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(isinstance(value, type(a)) and isinstance(value, bool) == isinstance(a, bool) for a in args)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        if not isinstance(value, list):  # TOML has no tuples or sets: a list stands for them
            return False
        return len(args) != 1 or all(matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def type_text(hint) -> str:
    """A type hint as a user reads it: `int`, `str | list[str] | None`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(a) for a in args)}]"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


@dataclass
class PeftOptions(ObjectiveOptions):
    peft_type: str = option("", flag="--peft-type",
                            help="a peft.PeftType, e.g. IA3, LOHA, VERA, PROMPT_TUNING (fewtune ls methods)")
    # the peft config's own fields, as given
    fields: dict = option(default_factory=dict, flag="--peft-option", key_value=True,
                          help="a field of the type's peft config; VALUE is a TOML value (8, 0.1, true, "
                               "[\"q_proj\"]) or else a string; repeatable")

    @classmethod
    def parse(cls, raw: dict, method: str):
        raw = dict(raw)
        peft_type = normalise_type(raw.pop("peft_type", None))
        objective = raw.pop("objective", "pbft")
        return cls(peft_type=peft_type, objective=objective, fields=raw)

    def __post_init__(self):
        super().__post_init__()
        if self.peft_type in UNSUPPORTED:
            raise FewtuneError(f"peft: {self.peft_type} is not supported: {UNSUPPORTED[self.peft_type]}.")
        cls = self.config_class
        valid = config_fields(cls)
        for key in self.fields:
            if key not in valid:
                raise FewtuneError(f"peft: {cls.__name__} has no field '{key}'.{did_you_mean(key, valid)} "
                                   f"Fields: {', '.join(valid)} (and objective).")
        hints = field_types(cls)
        for key, value in self.fields.items():
            # checked here: peft takes a value of the wrong type and fails later, inside the model's wrapping
            # ("'<=' not supported between instances of 'str' and 'int'" for r="eight")
            if key in hints and not matches(value, hints[key]):
                raise FewtuneError(f"peft: {cls.__name__} field '{key}' must be {type_text(hints[key])}, got "
                                   f"{value!r:.60} ({type(value).__name__}).")
            # ranges, not only types: peft builds no dropout for p <= 0 (nan is silently none) and stores a bare NaN
            # in the config, which strict JSON readers of the result then refuse
            if isinstance(value, float) and not math.isfinite(value):
                raise FewtuneError(f"peft: --peft-option {key}={value}: must be a finite number.")
            if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not 0 <= value < 1:
                raise FewtuneError(f"peft: --peft-option {key}={value}: a dropout probability must be in [0, 1).")
        missing = [k for k in REQUIRED.get(self.peft_type, ()) if self.fields.get(k) in (None, [], "")]
        if missing:
            raise FewtuneError(f"peft: {self.peft_type} needs option(s) {', '.join(missing)} "
                               f"(--peft-option {missing[0]}=...).")
        if self.objective == "ft" and is_prompt_learning(cls):
            raise FewtuneError(f"peft: {self.peft_type} adds virtual tokens and cannot be combined with objective ft "
                               "(a new classification head); use objective pbft.")
        # peft's own checks of the values, before any model is loaded (the tokenizer is the run's, known later)
        text_init = str(self.fields.get("prompt_tuning_init", "")).upper() == "TEXT"
        self.build(**({"tokenizer_name_or_path": "<the run's tokenizer>"} if text_init and not self.fields.get("tokenizer_name_or_path") else {}))

    @property
    def config_class(self):
        return peft_types()[self.peft_type]

    @property
    def prompt_learning(self) -> bool:
        return is_prompt_learning(self.config_class)

    def build(self, task_type: str | None = None, **extra):
        """The peft config object (a fresh one each call: get_peft_model fills in model-dependent fields)."""
        values = {**TYPE_DEFAULTS.get(self.peft_type, {}), **self.fields, **extra}
        task_type = task_type or ("SEQ_CLS" if self.objective == "ft" else "CAUSAL_LM")
        try:
            return self.config_class(task_type=task_type, **values)
        except (ValueError, TypeError, KeyError, ImportError, AttributeError) as e:
            raise FewtuneError(f"peft {self.peft_type}: {one_line(e)}") from None


class Peft(Method):
    Options = PeftOptions

    @property
    def defaults(self):
        lr = LR["prompt"] if self.opts.prompt_learning else LR.get(self.opts.peft_type, 2e-4)
        return dict(ADAPTER_DEFAULTS, lr=lr)

    @classmethod
    def listing(cls):
        offered = [t for t in sorted(peft_types()) if t not in UNSUPPORTED]
        return [f"--peft-type: {', '.join(offered)}"]

    def preset(self, name):
        # the quick preset's learning rate by kind of type: prompt learning, IA3 and VeRA need far higher rates
        if name != "quick":
            return {}
        kind = "prompt" if self.opts.prompt_learning else self.opts.peft_type
        return {"lr": QUICK_LR.get(kind, 5e-4)}

    def prepare(self, ctx, model):
        from peft import get_peft_model
        extra = {}
        if str(self.opts.fields.get("prompt_tuning_init", "")).upper() == "TEXT" and not self.opts.fields.get("tokenizer_name_or_path"):
            extra["tokenizer_name_or_path"] = ctx.tokenizer.name_or_path  # the run's own (local) tokenizer, never the Hub
        config = self.opts.build(**extra)
        try:
            try:
                wrapped = get_peft_model(model, config)
            except ValueError as e:
                # peft has no default target modules for this architecture: lora's rule (attention Linears)
                if "target_modules" not in str(e) or getattr(config, "target_modules", "absent") is not None:
                    raise
                config = self.opts.build(**extra, target_modules=attention_linears(model))
                wrapped = get_peft_model(model, config)
        except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError, AttributeError) as e:
            raise FewtuneError(f"peft {self.opts.peft_type} cannot be applied to {type(model).__name__}: {one_line(e)}") from None
        ctx.info["peft_type"] = self.opts.peft_type
        targets = getattr(config, "target_modules", None)
        if targets is not None:
            ctx.info["peft_target_modules"] = sorted(targets) if isinstance(targets, (set, list, tuple)) else str(targets)
        return align_virtual_tokens(wrapped)


def align_virtual_tokens(model):
    """Make prompt tuning / p-tuning score a left-padded batch exactly like one example at a time.

    peft prepends the virtual tokens before the whole padded row and drops the position ids, so the distance
    between the virtual tokens and the text would depend on how much padding the row got (its batch). Here the
    virtual tokens go right before each row's first real token and positions count from them, as in an unpadded
    row: [pad ... pad][virtual][text]. Prefix tuning needs nothing (peft offsets the position ids itself).
    Applied on the instance, also to a model reloaded by `fewtune predict` (saving.load).
    """
    from peft import PeftType
    cfg = model.active_peft_config if hasattr(model, "active_peft_config") else None
    if cfg is None or cfg.peft_type not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        return model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        if past_key_values is not None:
            raise FewtuneError("peft: a prompt-learning model cannot score after a cached prefix.")
        n = self.active_peft_config.num_virtual_tokens
        embeds = self.word_embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, width = input_ids.shape
        prompts = self.get_prompt(batch_size=batch).to(embeds.dtype)
        pads = (width - attention_mask.sum(-1)).tolist()
        rows = [torch.cat([embeds[i, :p], prompts[i], embeds[i, p:]]) for i, p in enumerate(pads)]
        mask = torch.stack([torch.cat([attention_mask[i, :p], attention_mask.new_ones(n), attention_mask[i, p:]])
                            for i, p in enumerate(pads)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.base_model(inputs_embeds=torch.stack(rows), attention_mask=mask, position_ids=positions, **kwargs)

    model.forward = types.MethodType(forward, model)
    return model

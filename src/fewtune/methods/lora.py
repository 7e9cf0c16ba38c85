"""LoRA through `peft`: low-rank adapters on the attention projections (configurable), base weights frozen.

Objective pbft (verbalizer over the LM head) or ft (a new head). With ft the head must train and be saved
with the adapter: `task_type=SEQ_CLS` makes peft put the head (`score`/`classifier`) in `modules_to_save`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FewtuneError
from .base import Method, ObjectiveOptions, option


@dataclass
class LoraOptions(ObjectiveOptions):
    r: int = option(8, flag="--lora-r", help="rank")  # higher = more capacity, more parameters and memory
    alpha: int = option(16, flag="--lora-alpha", help="alpha (scaling alpha/r)")
    dropout: float = option(0.05, flag="--lora-dropout", help="dropout")
    # default: every Linear inside attention modules
    target_modules: list = option(default_factory=list, flag="--lora-targets", kind=str, split=",",
                                  help="comma-separated module names [attention projections]")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise FewtuneError(f"lora: r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise FewtuneError(f"lora: alpha must be positive, got {self.alpha!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise FewtuneError(f"lora: dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]


def attention_linears(model) -> list[str]:
    """Leaf names of the Linear layers inside attention modules (q_proj, k_proj, v_proj, o_proj for Llama)."""
    names = set()
    for qual, module in model.named_modules():
        parts = qual.split(".")
        if isinstance(module, torch.nn.Linear) and any("attn" in p or "attention" in p for p in parts[:-1]):
            names.add(parts[-1])
    return sorted(names)


def lora_config(opts: LoraOptions, model, objective: str):
    from peft import LoraConfig
    available = {qual.split(".")[-1] for qual, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = list(opts.target_modules) or attention_linears(model)
    missing = [t for t in targets if t not in available]
    if missing or not targets:
        raise FewtuneError(f"LoRA target module(s) {missing or targets} not found in {type(model).__name__}; "
                           f"its Linear layers are: {', '.join(sorted(available))}.")
    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                      task_type="SEQ_CLS" if objective == "head" else "CAUSAL_LM")


def wrap(model, opts: LoraOptions, objective: str):
    from peft import get_peft_model
    return get_peft_model(model, lora_config(opts, model, objective))


# The study's budget for adapters (docs/methods.md): also cd's LoRA student and the peft method (its own lr per type)
ADAPTER_DEFAULTS = dict(epochs=80, batch_size=32, lr=2e-4, weight_decay=0.0, warmup_ratio=0.25)


class LoRA(Method):
    Options = LoraOptions
    defaults = ADAPTER_DEFAULTS
    presets = {"quick": {"lr": 5e-4}}

    def prepare(self, ctx, model):
        return wrap(model, self.opts, self.objective)

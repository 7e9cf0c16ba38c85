"""BitFit (Ben Zaken et al., ACL 2022): only the bias terms train (--bitfit-params norm: the norm weights instead).

`params = "norm"` trains the normalisation layers' weights instead, for models without biases (SmolLM2, Llama,
Gemma). Objective pbft (verbalizer over the LM head) or ft (a new head, which trains too, as in the paper's GLUE
setup).

A choice had to be made for bias-free models: BitFit as published trains every bias term (attention, MLP and
LayerNorm biases) and nothing else; SmolLM2's linear layers and RMSNorms have no biases, so `params = "bias"` (the
default) finds nothing there and the run stops with a one-line error naming the option. `params = "norm"` trains the
normalisation layers' parameters (RMSNorm/LayerNorm gains, and their biases where they have them): like biases, one
vector per layer and far less than 1 % of the weights, but multiplicative, so it is a BitFit-like method, not BitFit;
`bias+norm` trains both. A saved bitfit run ships only the vectors it trained (and the ft head), over the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FewtuneError
from .base import Method, ObjectiveOptions, option
from .layers import head_names
from .lora import ADAPTER_DEFAULTS

PARAMS = ("bias", "norm", "bias+norm")


@dataclass
class BitfitOptions(ObjectiveOptions):
    params: str = option("bias", flag="--bitfit-params", help="bias (every bias term: BitFit), norm (the "
                                                              "normalisation layers' weights: for bias-free models) "
                                                              "or bias+norm")

    def __post_init__(self):
        super().__post_init__()
        if self.params not in PARAMS:
            raise FewtuneError(f"bitfit: params (--bitfit-params) must be bias, norm or bias+norm, got "
                               f"{self.params!r:.40}.")


def is_norm(module) -> bool:
    """A normalisation layer: torch's LayerNorm/RMSNorm/GroupNorm, or an architecture's own (LlamaRMSNorm, ...)."""
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)) or "Norm" in type(module).__name__


def selected(model, params: str) -> list[str]:
    """Names of the parameters `params` selects (the head, tied or new, never: the objective decides it)."""
    heads = head_names(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    names = []
    norms = {name for name, m in model.named_modules() if is_norm(m)}
    for name, p in model.named_parameters():
        if name in heads or id(p) in tied:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        bias = name.endswith(".bias") or name == "bias"
        if ("bias" in params and bias) or ("norm" in params and owner in norms):
            names.append(name)
    return names


# BitFit's learning rates are 10-100x full fine-tuning's (the paper searches 1e-4 to 1e-3); the study's adapter
# budget otherwise (80 epochs, batch 32, warmup 0.25), as for LoRA
BITFIT_DEFAULTS = dict(ADAPTER_DEFAULTS, lr=1e-3)


class BitFit(Method):
    Options = BitfitOptions
    defaults = BITFIT_DEFAULTS
    # bitfit (norm weights of SmolLM2, CoLA, 32 shots, seed 0): 1e-3 took the training loss 0.78 -> 0.46 in the quick
    # preset's 20 steps, 1e-2 0.99 -> 0.31 (rising first); both near chance on 100 dev sentences
    presets = {"quick": {"lr": 1e-3}}
    ships_trained_only = True  # the vectors it trained (and the ft head): a few hundred KB over the base model

    def prepare(self, ctx, model):
        names = set(selected(model, self.opts.params))
        if not names:
            what = {"bias": "bias terms", "norm": "normalisation layers", "bias+norm": "bias terms or normalisation layers"}
            hint = " (its linear layers are bias-free); --bitfit-params norm trains its normalisation weights instead" \
                if self.opts.params == "bias" else ""
            raise FewtuneError(f"bitfit: {type(model).__name__} has no {what[self.opts.params]} to train (params = "
                               f"{self.opts.params!r}, --bitfit-params){hint}.")
        heads = head_names(model) if self.objective == "head" else set()
        for name, p in model.named_parameters():
            p.requires_grad_(name in names or name in heads)
        if ctx is not None:
            ctx.info["bitfit_params"] = self.opts.params
            ctx.info["bitfit_tensors"] = len(names)
        return model

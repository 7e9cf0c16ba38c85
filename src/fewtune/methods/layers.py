"""Finding the transformer blocks, embeddings and heads of any Hugging Face decoder, generically."""

from __future__ import annotations

import torch

from ..errors import FewtuneError


def find_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks: the ModuleList with num_hidden_layers entries."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    depth = getattr(cfg, "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if depth is None or len(module) == depth:
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise FewtuneError(f"Cannot find the transformer blocks of {type(model).__name__} (no ModuleList of {depth} layers).")
    return best


def head_names(model) -> set[str]:
    """Parameter names of a sequence-classification head (score / classifier), trained by every ft variant."""
    names = set()
    for n, _ in model.named_parameters():
        leaf = n.split(".")
        if any(part in ("score", "classifier") for part in leaf[-3:]) and "lora_" not in n:
            names.add(n)
    return names

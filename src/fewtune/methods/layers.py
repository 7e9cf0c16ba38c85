"""Finding the transformer blocks, embeddings and heads of any Hugging Face decoder, generically."""

from __future__ import annotations

import torch

from ..engine.models import text_config
from ..errors import FewtuneError


def find_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks: the ModuleList with num_hidden_layers entries."""
    cfg = text_config(model)
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


def params_after_blocks(model, blocks) -> list[str]:
    """Names of the parameters that sit after the last block and before the head, found by running the model.

    What follows the blocks differs by architecture and is not in the registration order (OPT registers
    `project_out` and `final_layer_norm` before its layers): GPT-2/Falcon/Bloom `ln_f`, OPT `final_layer_norm`
    and `project_out`, Llama `norm`. So one tiny forward pass records the order in which modules finish; the
    modules with parameters that finish after the last block are these, less the output head (the LM head, tied
    or not, and a classification head, which the methods handle themselves) and any parameter also used before
    the first block (a tied embedding).
    """
    finished = []  # (module name, module) in the order their forward passes complete
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: finished.append((name, mod)))
             for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False)) or m in blocks]
    device = next(model.parameters()).device
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", 2)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1 % vocab, 2 % vocab]], device=device),
                  attention_mask=torch.ones((1, 2), dtype=torch.long, device=device))
    finally:
        for h in hooks:
            h.remove()
    block_set = {id(b) for b in blocks}
    steps = [i for i, (_, m) in enumerate(finished) if id(m) in block_set]
    if not steps:
        return []
    first, last = steps[0], steps[-1]
    before = {id(p) for _, m in finished[:first] for p in m.parameters(recurse=False)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    head_params = head_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    after = []
    for _, m in finished[last + 1:]:
        for p in m.parameters(recurse=False):
            n = names.get(id(p))
            if n is not None and id(p) not in before and id(p) not in head and n not in head_params and n not in after:
                after.append(n)
    return after

"""Retention: what an adaptation costs the model's general language ability.

For methods that keep the LM head, the language-model loss (nats/token) on a held-out general-English text,
before adaptation (the loaded base model) and after it (the model as it is scored), and their difference.
The default text is a fixed, seeded sample of deduplicated MNLI dev_matched premises (several genres) read from
the data root; any sentence that is a training or evaluation example of the run (any field) is left out.
`RunConfig.retention`: "mnli-premises" (the first 100 of the seeded order: 1,889 SmolLM2 tokens),
"mnli-premises:N" (the first N), a UTF-8 text file (one sentence per line), or "off". Measured costs: docs/methods.md.
"""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from .errors import FewtuneError
from .util import read_text_file

DEFAULT = "mnli-premises"
OFF = "off"
N_SENTENCES = 100  # two forward passes over the text: 500 sentences took ~250 s per pass on the shared 2-core machine
SEED = 0
MAX_LOGITS = 2**25  # batch x length x vocabulary floats per forward pass (128 MiB in fp32)


def mnli_premises(data_root: str | None) -> tuple[list[str], str]:
    """Deduplicated MNLI dev_matched premises in a fixed seeded order, and the file they came from.

    Looked up in the run's data root, then in fewtune's default one ($FEWTUNE_DATA, ../shared/data), so a run on
    a task of its own (another data root) still measures retention on the same text."""
    from .settings import data_root as default_root
    roots = []
    if data_root:
        roots.append(Path(data_root).expanduser())
    try:
        found = default_root(None)
    except FewtuneError:
        found = None
    if found is not None:
        roots.append(found)
    for root in roots:
        path = root / "mnli" / "dev_matched.tsv"
        if path.is_file():
            break
    else:
        where = ", ".join(str(r) for r in roots) or "no data root found"
        raise FewtuneError(f"retention: the default text needs mnli/dev_matched.tsv in the data root ({where}); "
                           "give retention = \"path/to/text.txt\" (--retention-text FILE) or \"off\".")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            premises = [(row.get("sentence1") or "").strip() for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FewtuneError(f"retention: cannot read {path} ({e}).") from None
    unique = list(dict.fromkeys(p for p in premises if p))
    order = np.random.default_rng(SEED).permutation(len(unique))
    return [unique[i] for i in order], str(path)


def read_file(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FewtuneError(f"retention: text file {path} does not exist (retention = a file, \"{DEFAULT}\" or \"{OFF}\").")
    text = read_text_file(path, "retention: text file (--retention-text)")
    return [line.strip() for line in text.splitlines() if line.strip()]


def sentences(spec: str, data_root: str | None, exclude: set[str]) -> tuple[list[str], dict] | None:
    """The run's retention sentences and where they came from; None when retention is off."""
    if spec == OFF:
        return None
    if spec == DEFAULT or spec.startswith(DEFAULT + ":"):
        count = spec[len(DEFAULT) + 1:] or str(N_SENTENCES)
        if not count.isdigit() or int(count) < 1:
            raise FewtuneError(f"retention: {spec!r}: expected {DEFAULT}:N with N a positive number of sentences.")
        pool, source, limit = *mnli_premises(data_root), int(count)
    else:
        pool, source, limit = read_file(spec), str(Path(spec).expanduser()), None
    kept, skipped = [], 0
    for s in pool:
        if limit is not None and len(kept) == limit:
            break
        if s in exclude:
            skipped += 1
        else:
            kept.append(s)
    if not kept:
        reason = "is empty" if not pool else "holds only training or evaluation examples of this run"
        raise FewtuneError(f"retention: the text ({source}) {reason}; give another file or retention = \"{OFF}\".")
    text = "\n".join(kept)
    return kept, {"text": spec, "source": source, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                  "n_sentences": len(kept), "excluded_sentences": skipped}


def lm_loss(model, tokenizer, texts: list[str], device, dtype: str = "fp32", batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss (nats/token) over the texts, each scored on its own after the tokenizer's BOS.

    Every token of a text is predicted except the first when there is no BOS to predict it from."""
    from .engine.batching import collate, encode, length_batches
    from .engine.devices import autocast
    seqs, _ = encode(tokenizer, texts)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), autocast(dtype, device):
        for idx in length_batches([len(s) for s in seqs], batch_size):
            width = max(len(seqs[i]) for i in idx)
            step = max(1, min(len(idx), MAX_LOGITS // max(1, width * vocab)))
            for start in range(0, len(idx), step):
                rows = [seqs[i] for i in idx[start:start + step]]
                batch = collate(rows, tokenizer.pad_token_id, device=device)
                logits = model(**batch).logits[:, -batch["input_ids"].shape[1]:].float()  # virtual tokens come first
                targets = batch["input_ids"][:, 1:]
                mask = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
                logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                total += float(-(logp * mask).sum())
                count += int(mask.sum())
    if count == 0:
        raise FewtuneError("retention: the text has no token to predict.")
    return total / count, count


class Retention:
    """Measures the loss before adaptation (`before`) and after it (`after`), into the result's `retention`."""

    def __init__(self, texts: list[str], meta: dict, tokenizer, device, dtype: str, batch_size: int):
        self.texts, self.meta, self.tokenizer = texts, dict(meta), tokenizer
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.seconds = 0.0

    def _loss(self, model):
        t0 = time.perf_counter()
        loss, n = lm_loss(model, self.tokenizer, self.texts, self.device, self.dtype, self.batch_size)
        self.seconds += time.perf_counter() - t0
        self.meta["n_tokens"] = n
        return loss

    def before(self, model):
        self.meta["loss_before"] = self._loss(model)

    def after(self, model, unchanged: bool = False):
        self.meta["loss_after"] = self.meta["loss_before"] if unchanged else self._loss(model)
        self.meta["delta"] = self.meta["loss_after"] - self.meta["loss_before"]
        self.meta["seconds"] = round(self.seconds, 3)
        return self.meta


def example_texts(examples) -> set[str]:
    """Every field value of the examples (a premise, a hypothesis, a sentence), stripped."""
    return {str(v).strip() for ex in examples for v in ex.fields.values()}

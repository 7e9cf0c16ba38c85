"""Keeping what was trained: the model or adapter (safetensors) with its task's pattern and verbalizer,
and using it on new text (`fewtune predict`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import Example
from .engine import batching, devices, engine, models
from .errors import FewtuneError
from .stats.metrics import METRICS
from .methods.base import input_text
from .methods.peft import align_virtual_tokens
from .tasks import Pattern, Task

MANIFEST = "fewtune.json"
TRAINED = "trained.safetensors"  # a method that ships only what it trained (probe's head, bitfit's biases)
FORMAT = 1  # the manifest's "format" as `save` writes it; a folder of another format is refused, never half-read


def check_save_folder(directory) -> None:
    """--save-model writes into a new or empty folder, or over an earlier fewtune save (it has a fewtune.json).
    Any other non-empty folder is refused: saving writes config.json, README.md, tokenizer files and weights,
    and would overwrite the user's own files of those names."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise FewtuneError(f"--save-model {out} is a file; give a folder.")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FewtuneError(f"--save-model {out} is a folder with other files in it (not an earlier fewtune save, no "
                           f"{MANIFEST}); saving would overwrite files such as README.md or config.json: give a new "
                           "or empty folder.")


def check_format(manifest, path) -> None:
    """A manifest this fewtune can read: an object whose `format` is FORMAT."""
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise FewtuneError(f"{path} has format {found!r:.40}; this fewtune reads format {FORMAT} (a model saved by "
                           "another fewtune version: use that version, or save the model again with --save-model).")


def check_weights(folder: Path, stem: str) -> None:
    """The saved weights (`stem`*.safetensors: model, adapter_model or trained) are there and whole, checked before
    loading: peft would otherwise take an adapter folder without its weights for a Hub repository id and go to the
    network, and a truncated file would fail inside the libraries with a traceback."""
    from safetensors import safe_open
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    if not files:
        raise FewtuneError(f"{folder}: the saved weights ({stem}.safetensors) are missing; save the model again "
                           "with --save-model.")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):  # checks that the header's tensors cover the file exactly
                pass
        except Exception as e:  # SafetensorError, OSError: one line
            raise FewtuneError(f"{f} is damaged or truncated ({' '.join(str(e).split())[:160]}); save the model "
                               "again with --save-model.") from None


def load_tokenizer(folder: Path):
    """The saved tokenizer, or a one-line error: transformers would look a folder without tokenizer files up on
    the Hub (a repository id) and fail with a traceback, and a damaged file fails inside the tokenizers library."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        raise FewtuneError(f"{folder}: the saved tokenizer (tokenizer.json, tokenizer_config.json) is missing; save the "
                           "model again with --save-model.")
    try:
        from transformers import AutoTokenizer
        return models.prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    except Exception as e:  # JSONDecodeError, OSError, the tokenizers library's exceptions: one line
        raise FewtuneError(f"{folder}: the saved tokenizer cannot be read ({models.load_error(e, 160)}); save the model "
                           "again with --save-model.") from None


def save(directory, model, tokenizer, cfg, task, pattern, method, result, prefix: str | None = None) -> None:
    """Write what `predict` needs. icl trains nothing: it saves its demonstrations (`prefix`, the text scored before
    every query) and the name of the base model, not a copy of the weights."""
    out = Path(directory)
    check_save_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FewtuneError(f"--save-model {out}: cannot create the folder ({e.strerror}).") from None
    is_adapter = hasattr(model, "peft_config")
    by_reference = not method.trains  # icl: the base model is used as it is
    trained_only = method.ships_trained_only and not is_adapter  # probe, bitfit: what they trained, over the base
    base = cfg.model
    if (is_adapter or by_reference or trained_only) and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())  # a relative folder would not resolve from elsewhere
    if trained_only:
        from safetensors.torch import save_file
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(out / TRAINED))
    elif not by_reference:
        model.save_pretrained(out, safe_serialization=True)  # peft: adapter + modules_to_save (the ft head)
    tokenizer.save_pretrained(out)
    manifest = {
        "format": 1, "method": cfg.method, "objective": method.objective, "adapter": is_adapter,
        "base_model": base if (is_adapter or by_reference or trained_only) else None,
        "weights": "trained" if trained_only else not by_reference,
        "prefix": prefix if by_reference else None,
        "task": {"name": task.name, "version": task.version, "labels": list(task.labels), "fields": list(task.fields),
                 "raw_separator": task.raw_separator, "pattern": pattern.template, "verbalizer": list(pattern.verbalizer)},
        "max_length": cfg.max_length, "config": cfg.to_dict(), "config_hash": result.get("config_hash"),
        "evals": {k: {m: v.get(m) for m in ("n", *METRICS)} for k, v in result.get("evals", {}).items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def load(directory, device="cpu"):
    """(model, tokenizer, manifest) from a folder written by `save`."""
    folder = Path(directory)
    path = folder / MANIFEST
    if not path.exists():
        raise FewtuneError(f"{folder} is not a fewtune model folder (no {MANIFEST}); write one with `fewtune run --save-model DIR`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FewtuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    check_format(manifest, path)
    weights = manifest.get("weights")
    if weights is not False:  # a save that names its base model instead carries no weights
        check_weights(folder, "trained" if weights == "trained" else "adapter_model" if manifest["adapter"] else "model")
    n_labels = len(manifest["task"]["labels"])
    tokenizer = load_tokenizer(folder)
    if weights is False:  # icl: the base model itself, with the saved demonstrations
        model = models.load_model(manifest["base_model"], manifest["objective"], n_labels)
        models.set_pad_token(model, tokenizer)
    elif weights == "trained":  # probe, bitfit: the base model with the parameters the run trained put back
        model = models.load_model(manifest["base_model"], manifest["objective"], n_labels)
        models.set_pad_token(model, tokenizer)
        load_trained(model, folder / TRAINED)
    elif manifest["adapter"]:
        from peft import PeftModel
        base = models.load_model(manifest["base_model"], manifest["objective"], n_labels)
        models.set_pad_token(base, tokenizer)
        model = PeftModel.from_pretrained(base, str(folder))
        model = align_virtual_tokens(model)  # prompt tuning scores as it did in training
    else:
        model = models.load_model(str(folder), manifest["objective"], n_labels)
        models.set_pad_token(model, tokenizer)
    model = reloaded(model, manifest)
    model.to(device).eval()
    return model, tokenizer, manifest


def load_trained(model, path: Path) -> None:
    """Put the trained parameters saved in `path` into the base model, each by name; a name or shape the base
    model does not have means the folder was saved from another model: one line."""
    from safetensors.torch import load_file
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(path)).items():
            if name not in params or params[name].shape != tensor.shape:
                raise FewtuneError(f"{path}: parameter {name} {tuple(tensor.shape)} is not in the base model "
                                   f"{type(model).__name__} (saved from another model?); save the model again.")
            params[name].copy_(tensor)


def reloaded(model, manifest: dict):
    """The method's own way of scoring a reloaded model (methods.base.Method.reloaded; probe's mean pooling)."""
    from .methods import REGISTRY
    cls = REGISTRY.get(manifest.get("method"))
    options = (manifest.get("config") or {}).get("method_options") or {}
    return cls(options).reloaded(model) if cls is not None else model


def predict(directory, rows: list[dict], device="auto", batch_size: int = 16) -> list[dict]:
    """Predictions for rows of text fields (dicts keyed by the task's field names)."""
    dev = devices.pick_device(device)
    model, tokenizer, manifest = load(directory, dev)
    t = manifest["task"]
    for n, row in enumerate(rows, 1):
        missing = [f for f in t["fields"] if f not in row]
        if missing:
            raise FewtuneError(f"input row {n}: missing field(s) {missing}; this model expects {t['fields']}.")
    # the saved task, as far as formatting a query needs it (no splits: no data is read)
    task = Task(name=t["name"], version=t["version"], labels=tuple(t["labels"]), fields=tuple(t["fields"]),
                patterns=(Pattern(t["pattern"], tuple(t["verbalizer"])),), splits={}, train="", in_domain="",
                out_of_domain=(), raw_separator=t["raw_separator"])
    examples = [Example(idx=n, fields={f: str(r[f]) for f in t["fields"]}, label=0) for n, r in enumerate(rows)]
    texts = [input_text(task, task.patterns[0], ex, manifest["objective"]) for ex in examples]
    label_ids = models.verbalizer_token_ids(tokenizer, t["verbalizer"]) if manifest["objective"] == "lm" else None
    prefix = manifest.get("prefix")
    prefix_ids = batching.encode(tokenizer, [prefix])[0][0] if prefix else None
    # as in the run: with demonstrations the BOS goes once before the prefix; the query is cut to max_length either way
    seqs, _ = batching.encode(tokenizer, texts, manifest["max_length"], with_bos=prefix_ids is None)
    out = engine.score(model, tokenizer, seqs, label_ids, dev, "fp32", batch_size, prefix_ids=prefix_ids)
    probs = torch.softmax(torch.tensor(out.logits), -1).numpy()
    return [{"label": t["labels"][int(p.argmax())], "probabilities": dict(zip(t["labels"], map(float, p)))} for p in probs]

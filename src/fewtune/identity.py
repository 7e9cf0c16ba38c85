"""A run's identity: everything that changes its result, and nothing that does not.

`RunConfig.hash()` is the sha256 of `identity(cfg)`: the config's fields with
- `task` replaced by the task's name and the hash of its content as loaded (a task file's path is where it
  is, not what it is: `../tasks/sst2.toml` and `/abs/tasks/sst2.toml` are one experiment; an edited pattern is another);
- `method_options` normalised, defaults filled in (cd `{}` and `{context = "instruction"}` are one run);
- `data_source` and `data_root` replaced by the provenance of every split the run reads (a local file's sha256,
  or the Hub dataset, config, split and revision): the same files in another folder are the same experiment;
- `model`, when it is a local folder, replaced by the folder's name and the sha256 of its config, weight and
  tokenizer files (a folder is where a model is, not what it is: weights trained again in the same folder are
  another model); bundled names and Hub ids stay as given;
- where and how it runs left out (`device`, `eval_batch_size`);
- `retention` left out at its default (it adds a measurement; results stored before it existed keep their hash),
  a retention text file replaced by the sha256 of its content.
Runs whose identity differs are never pooled in the report; the identity is stored with every result.
"""

from __future__ import annotations

import dataclasses
import hashlib

from .util import digest

VOLATILE = ("data_root", "device", "eval_batch_size")  # where/how a run executes, not what it computes


def identity(cfg) -> dict:
    """The identity of a RunConfig (see the module docstring). Raises FewtuneError for an unknown task or
    method, or bad method options, so a grid refuses such a cell before anything runs."""
    from .data import provenance
    from .methods import get_method
    from .tasks import load_task
    d = cfg.to_dict()
    task = load_task(cfg.task)
    method = get_method(cfg.method, cfg.method_options)
    for volatile in VOLATILE:
        d.pop(volatile, None)
    d.pop("data_source", None)
    d["task"] = {"name": task.name, "sha256": task.sha256[:16]}
    d["method_options"] = dataclasses.asdict(method.opts)
    retention = d.pop("retention", "mnli-premises")
    if retention != "mnli-premises":
        from pathlib import Path
        path = Path(retention).expanduser()
        d["retention"] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]} if path.is_file() else retention
    d["model"] = model_identity(cfg.model)
    splits = [task.train, *(cfg.eval_splits or task.eval_splits)]
    d["data"] = {name: provenance(task, name, cfg.data_root, cfg.data_source) for name in dict.fromkeys(splits)}
    return d  # not cached: a task or data file may change between two calls (file hashes are cached by mtime)


# Files of a Hugging Face model folder that decide its outputs (tokenizer files included: they decide the ids).
MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.pt", "tokenizer.json", "tokenizer_config.json",
                       "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")


def model_identity(spec: str):
    """A bundled model's name or a Hub id as given; a local folder as {"folder": its name, "sha256": of the sorted
    (file name, file sha256) of its config, weight and tokenizer files} (file hashes cached by size and mtime)."""
    from pathlib import Path

    from .data import file_sha256
    from .engine.models import BUNDLED
    path = Path(spec).expanduser()
    if spec in BUNDLED or not path.is_dir():
        return spec
    files = sorted({f for pattern in MODEL_FILE_PATTERNS for f in path.glob(pattern) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return {"folder": path.resolve().name, "sha256": h.hexdigest()[:16]}


def run_hash(cfg) -> str:
    """The run's key: `digest(identity(cfg))` (callers that also need the identity compute it once and digest it)."""
    return digest(identity(cfg))

"""Run presets: hyperparameters for quick CPU runs. The defaults (no preset) are the study's GPU budgets.

`quick`: every method finishes a 32-shot run in a few minutes on 2 CPU cores with the bundled model.
It trades the study's 40-80 epochs at batch 32 for 5 epochs at batch 8 (20 optimizer steps for 32 shots,
where batch 32 would give only 5), with learning rates raised to make those few steps count.
"""

from __future__ import annotations

from .errors import unknown

PRESETS = {
    "quick": {
        "common": dict(epochs=5, batch_size=8, warmup_ratio=0.1, eval_limit=100),
        "lr": {"ft": 2e-5, "pbft": 2e-5, "adaptive": 1e-4, "lora": 5e-4, "cd": 2e-5, "cd-lora": 5e-4,
               # peft: by kind of type (methods/peft.py preset_key); "peft" is every other type
               "peft": 5e-4, "peft-prompt": 3e-2, "peft-IA3": 1e-2, "peft-VERA": 1e-2},
    },
}


def preset_values(name: str | None, method: str, student_lora: bool = False, key: str | None = None) -> dict:
    """The preset's values for a method; `key` names a method variant with its own learning rate (e.g. peft-IA3)."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    p = PRESETS[name]
    values = dict(p["common"])
    keys = [key] if key else []
    keys += ["cd-lora" if (method == "cd" and student_lora) else method]
    for k in keys:
        if k in p["lr"]:
            values["lr"] = p["lr"][k]
            break
    return values

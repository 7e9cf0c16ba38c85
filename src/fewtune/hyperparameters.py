"""A run's training hyperparameters: the method's defaults (the study's GPU budgets) < a preset (`--preset quick`,
for CPU runs) < the fields set in the config. (Grid specs shipped with fewtune are another kind of preset:
`presets/*.toml`.)

`quick`: every method finishes a 32-shot run in a few minutes on 2 CPU cores with the bundled model.
It trades the study's 40-80 epochs at batch 32 for 5 epochs at batch 8 (20 optimizer steps for 32 shots,
where batch 32 would give only 5), with learning rates raised to make those few steps count.
"""

from __future__ import annotations

from .errors import unknown

KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "micro_batch_size")  # RunConfig fields

PRESETS = {
    "quick": {
        "common": dict(epochs=5, batch_size=8, warmup_ratio=0.1, eval_limit=100),
        "lr": {"ft": 2e-5, "pbft": 2e-5, "adaptive": 1e-4, "lora": 5e-4, "cd": 2e-5, "cd-lora": 5e-4,
               # peft: by kind of type (methods/peft.py preset_keys); "peft" is every other type
               "peft": 5e-4, "peft-prompt": 3e-2, "peft-IA3": 1e-2, "peft-VERA": 1e-2,
               # bitfit (norm weights of SmolLM2, CoLA, 32 shots, seed 0): 1e-3 took the training loss 0.78 -> 0.46 in
               # the 20 steps, 1e-2 0.99 -> 0.31 (rising first); both near chance on 100 dev sentences. lpft: ft's.
               "bitfit": 1e-3},
    },
}


def preset_values(name: str | None, keys: tuple = ()) -> dict:
    """The preset's values for a method: the common ones, and the learning rate of the first of `keys`
    (`Method.preset_keys`, most specific first, e.g. peft-IA3 then peft) that the preset lists."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    p = PRESETS[name]
    values = dict(p["common"])
    for k in keys:
        if k in p["lr"]:
            values["lr"] = p["lr"][k]
            break
    return values


def for_run(cfg, method) -> dict:
    """The hyperparameters of a run of `method` under the RunConfig `cfg`: method defaults < preset < config."""
    hp = dict(method.defaults)
    preset = preset_values(cfg.preset, method.preset_keys)
    hp.update({k: v for k, v in preset.items() if k != "eval_limit"})
    for key in KEYS:
        if getattr(cfg, key) is not None:
            hp[key] = getattr(cfg, key)
    return hp

"""A run's training hyperparameters: the method's defaults (the study's GPU budgets) < a preset (`--preset quick`,
for CPU runs) < the fields set in the config. (Grid specs shipped with fewtune are another kind of preset:
`presets/*.toml`.)

`quick`: every method finishes a 32-shot run in a few minutes on 2 CPU cores with the bundled model.
It trades the study's 40-80 epochs at batch 32 for 5 epochs at batch 8 (20 optimizer steps for 32 shots,
where batch 32 would give only 5), with learning rates raised to make those few steps count.
"""

from __future__ import annotations

from .errors import FewtuneError, unknown

KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "micro_batch_size")  # RunConfig fields

# What a preset sets for every method; each method's own values (its learning rate) are in its file (`presets`).
PRESETS = {
    "quick": dict(epochs=5, batch_size=8, warmup_ratio=0.1, eval_limit=100),
}


def preset_values(name: str | None, method=None) -> dict:
    """The preset's values for a run of `method` (a Method, or None for the shared values only): the shared ones and
    the method's own (`Method.preset`, its learning rate)."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    values = dict(PRESETS[name])
    if method is not None:
        values.update(method.preset(name))
    return values


def for_run(cfg, method) -> dict:
    """The hyperparameters of a run of `method` under the RunConfig `cfg`: method defaults < preset < config."""
    hp = dict(method.defaults)
    preset = preset_values(cfg.preset, method)
    hp.update({k: v for k, v in preset.items() if k != "eval_limit"})
    for key in KEYS:
        if getattr(cfg, key) is not None:
            hp[key] = getattr(cfg, key)
    budget = method.budget(hp)  # what the run records: the loop's values, or a solver's (probe: no learning rate)
    if cfg.preset and method.trains and "lr" in budget and "lr" not in preset and cfg.lr is None:
        # without it the run would silently keep the study budget's rate under the preset's few steps
        raise FewtuneError(f"method '{method.name}' names no learning rate for --preset {cfg.preset} "
                           f"(`presets` in its file); give --lr, or run it without the preset.")
    return budget

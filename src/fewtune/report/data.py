"""From database rows to the report's numbers: one flat record per run, then mean, sd and a bootstrap
interval over seeds per method x task x model x sample size. Nothing is recomputed from models:
every number is read from the stored result or aggregated from those stored numbers.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0          # fixed: the same database gives the same report
CONFIDENCE = 0.95
VARIANT_IGNORES = ("seed", "train_seed", "data_root", "device", "eval_batch_size")  # what may differ within a group
COST_KEYS = ("train_seconds", "eval_seconds", "peak_memory_mib", "trainable_params", "total_params")


def split_roles(evals: dict | None) -> tuple[str | None, str | None]:
    """The in-domain split and the first out-of-domain split of a run's evaluations."""
    evals = evals or {}
    ind = next((k for k, e in evals.items() if isinstance(e, dict) and e.get("role") == "in_domain"), None)
    ood = next((k for k, e in evals.items() if isinstance(e, dict) and e.get("role") == "out_of_domain"), None)
    return ind, ood


def variant_of(config: dict) -> str:
    """Id of a run's configuration up to its seeds: runs with the same variant are averaged together."""
    d = {k: v for k, v in config.items() if k not in VARIANT_IGNORES}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def flat_row(row: dict) -> dict:
    """One database row as flat columns (for `fewtune results` and the report)."""
    cfg = row.get("config") or {}
    evals = row.get("metrics") or {}
    cost = row.get("cost") or {}
    ind, ood = split_roles(evals)
    out = {"config_hash": row["config_hash"], "status": row["status"], "label": row.get("label") or cfg.get("method"),
           "grid": row.get("grid"), "model": row.get("model"), "task": row.get("task"), "method": row.get("method"),
           "shots": row.get("shots"), "seed": row.get("seed"), "variant": variant_of(cfg) if cfg else None,
           "id_split": ind, "ood_split": ood}
    for prefix, split in (("id", ind), ("ood", ood)):
        e = evals.get(split, {}) if split else {}
        for metric in ("accuracy", "mcc", "macro_f1", "n"):
            out[f"{prefix}_{metric}"] = e.get(metric)
    for key in COST_KEYS:
        out[key] = cost.get(key)
    out.update(attempts=row.get("attempts"), error=row.get("error"), started_at=row.get("started_at"),
               finished_at=row.get("finished_at"), log_path=row.get("log_path"),
               config=json.dumps(cfg, sort_keys=True))
    return out


def mean_sd(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def bootstrap_ci(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over seeds; NaN with fewer than two values.
    With 3-5 seeds it is narrower than the truth: read it as a lower bound on the uncertainty."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1)
    alpha = (1 - CONFIDENCE) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def group_runs(flat: list[dict]) -> list[dict]:
    """Successful runs grouped by (task, model, label, shots, variant), with statistics over seeds.
    A label used with two different configurations gets the variant appended, so nothing is pooled silently."""
    groups: dict[tuple, list[dict]] = {}
    for r in flat:
        if r["status"] == "success":
            groups.setdefault((r["task"], r["model"], r["label"], r["shots"], r["variant"]), []).append(r)
    variants: dict[tuple, set] = {}
    for task, model, label, shots, variant in groups:
        variants.setdefault((task, model, label, shots), set()).add(variant)
    out = []
    for (task, model, label, shots, variant), runs in groups.items():
        name = label if len(variants[(task, model, label, shots)]) == 1 else f"{label} [{variant}]"
        g = {"task": task, "model": model, "label": name, "method": runs[0]["method"], "shots": shots,
             "variant": variant, "seeds": sorted(r["seed"] for r in runs), "n_runs": len(runs),
             "id_split": runs[0]["id_split"], "ood_split": runs[0]["ood_split"],
             "id_n": runs[0]["id_n"], "ood_n": runs[0]["ood_n"], "runs": [r["config_hash"] for r in runs]}
        for prefix in ("id", "ood"):
            for metric in ("accuracy", "mcc"):
                values = [r[f"{prefix}_{metric}"] for r in runs]
                mean, sd = mean_sd(values)
                lo, hi = bootstrap_ci(values)
                g[f"{prefix}_{metric}"] = {"mean": mean, "sd": sd, "lo": lo, "hi": hi,
                                           "n": sum(v is not None for v in values)}
        for key in COST_KEYS:
            g[key] = mean_sd([r[key] for r in runs])[0]
        out.append(g)
    out.sort(key=lambda g: (g["task"], g["model"], g["label"], g["shots"]))
    return out


def model_order(groups: list[dict]) -> list[tuple[str, str]]:
    """(task, model) pairs in report order."""
    seen = []
    for g in groups:
        if (g["task"], g["model"]) not in seen:
            seen.append((g["task"], g["model"]))
    return seen


# --- formatting: one place, so the tables and the test read the same digits
def pct(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def num(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def mean_pm_sd(stat: dict, scale=pct) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    return scale(stat["mean"]) + ("" if math.isnan(stat["sd"]) else f" ± {scale(stat['sd'])}")


def interval(stat: dict, scale=pct) -> str:
    return "–" if math.isnan(stat["lo"]) else f"[{scale(stat['lo'])}, {scale(stat['hi'])}]"


def seconds(x) -> str:
    return "–" if x is None or math.isnan(x) else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def mib(x) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.0f}"


def params(x) -> str:
    if x is None or math.isnan(x):
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"

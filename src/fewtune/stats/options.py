"""Options: the runs of one identity up to their seeds, read from the results database, with the task's metrics
over seeds and their paired, seed-aware intervals (fewtune.stats.stats) from the stored per-example predictions. The
report and `--until-resolved` both read options here, and ask fewtune.stats.compare what may be claimed about them.
Nothing is recomputed from models: every number is read from the stored result or aggregated from the stored
predictions.

An *option* is every run of one identity up to its seeds (variant_hash): runs whose identity differs
(task content, data, normalised method options, anything but the seeds) are never pooled.
"""

from __future__ import annotations

import json
import math

import numpy as np

from ..util import digest
from . import stats
from .metrics import METRICS

VARIANT_IGNORES = ("seed", "train_seed", "data_root", "device", "eval_batch_size")  # legacy rows (no identity)
COST_KEYS = ("train_seconds", "eval_seconds", "peak_memory_mib", "trainable_params", "total_params",
             "predict_seconds_per_1k", "predict_tokens_per_1k", "predict_peak_memory_mib", "shipped_bytes",
             "retention_delta")
# Measured costs (time, memory) of an option are the median over its runs: one run slowed by other work on the
# machine (a make demo's first zero-shot run took 135 s to evaluate, its two others 15.0 and 16.8 s) must not move
# the option's cost, its budgets or its break-evens. Counted costs (parameters, tokens, bytes) and the retention
# loss are means.
MEDIAN_KEYS = ("train_seconds", "eval_seconds", "predict_seconds_per_1k", "peak_memory_mib", "predict_peak_memory_mib")
# A run whose time is at least OUTLIER_RATIO times its option's median, or at most 1/OUTLIER_RATIO of it, and differs
# from it by at least OUTLIER_MIN_SECONDS, is flagged (g["cost_outliers"]), when the option has OUTLIER_MIN_RUNS runs:
# with two, neither is the odd one out. The floor keeps a 0.02 s training against a median of 0.05 s unflagged.
OUTLIER_KEYS = ("train_seconds", "eval_seconds", "predict_seconds_per_1k")
OUTLIER_RATIO = 2.0
OUTLIER_MIN_RUNS = 3
OUTLIER_MIN_SECONDS = 1.0


def split_roles(evals: dict | None) -> tuple[str | None, str | None]:
    """The in-domain split and the first out-of-domain split of a run's evaluations."""
    evals = evals or {}
    ind = next((k for k, e in evals.items() if isinstance(e, dict) and e.get("role") == "in_domain"), None)
    ood = next((k for k, e in evals.items() if isinstance(e, dict) and e.get("role") == "out_of_domain"), None)
    return ind, ood


def variant_hash(ident: dict) -> str:
    """Id of an identity up to its seeds: runs of one variant are the same experiment under other seeds."""
    return digest({k: v for k, v in ident.items() if k not in ("seed", "train_seed")}, 8)


def variant_of(row: dict) -> str:
    """Id of a run's identity up to its seeds, with `dtype = "auto"` resolved to the precision the run used (its
    result's `dtype`). Rows written before identities were stored are keyed on their config and marked legacy, so
    they never pool with newer runs."""
    result = row.get("result") or {}
    if result.get("identity"):
        ident = result["identity"]
        if ident.get("dtype") == "auto" and result.get("dtype"):
            # what "auto" resolved to where the run ran (bf16 on one machine, fp32 on another): never pooled
            ident = {**ident, "dtype": f"auto:{result['dtype']}"}
        return variant_hash(ident)
    cfg = row.get("config") or {}
    d = {k: v for k, v in cfg.items() if k not in VARIANT_IGNORES}
    return "legacy-" + digest(d, 6)


def primary_metric(row: dict) -> str:
    """The task's primary metric as recorded with the run (accuracy for runs recorded before it was)."""
    return ((row.get("result") or {}).get("task") or {}).get("primary_metric") or "accuracy"


# ----------------------------------------------------------------------------- how costs were measured
COST_KIND = {"train_seconds": "time", "eval_seconds": "time", "predict_seconds_per_1k": "time", "use_seconds": "time",
             "peak_memory_mib": "memory", "predict_peak_memory_mib": "memory"}
# parameters, tokens, shipped bytes and labelled examples are counted, not measured: they always compare


def measured_as(row: dict) -> dict[str, str]:
    """The conditions a run's measured costs depend on, in words, per kind: costs compare only between runs whose
    words are the same. Time: the processor (the GPU's name, else the CPU's model), precision, torch threads,
    whether other cells shared the machine (cost.shared_with; a Ray node is shared with whatever Ray schedules), and
    the scoring batch. Memory: the processor, precision and scoring batch, and on CPU the kind of process (peak memory
    there is the process's RSS, which in a warm worker also holds its cached models). Fields a run did not record
    (runs made before they were) read "unrecorded", so such runs compare only with each other."""
    result = row.get("result") or {}
    cost = row.get("cost") or result.get("cost") or {}
    machine = result.get("machine") or {}
    device = str(result.get("device") or "unrecorded device")
    gpu = device.startswith("cuda")
    proc = (machine.get("gpu") or "a GPU") if gpu else (machine.get("cpu") or "an unrecorded CPU")
    dtype = result.get("dtype") or "unrecorded precision"
    backend = cost.get("backend")
    threads = cost.get("torch_threads") or (machine.get("torch_threads") if backend is None else None)
    shared = cost.get("shared_with")
    if backend is None:
        company = "alone" if result.get("machine") else "sharing unrecorded"  # `fewtune run`, or a run recorded before
    elif shared is None:
        share = cost.get("ray_num_gpus")
        company = "on a shared Ray node" + (f", {share:g} of a GPU" if share and share < 1 else "")
    else:
        company = "alone" if shared == 0 else f"beside {shared} other cell{'s' if shared > 1 else ''}"
    batching = cost.get("eval_batching")
    rows = cost.get("eval_max_batch_rows", cost.get("eval_batch_size"))  # (its name in results recorded before)
    batch = (f"scoring batches of {rows} rows" if batching == "rows" else
             f"scoring batches of {batching.split(':', 1)[1]} tokens" if batching else "scoring batch unrecorded")
    warm = backend in ("warm", "ray-warm")
    if gpu:  # CUDA's max allocated: a warm template kept on the GPU is in it
        holds = ", with a warm template on the GPU" if cost.get("warm_template_on_device") else ""
    else:    # the process's RSS: a warm worker's holds its cached models
        holds = ", a warm worker's RSS" if warm else ", a process's own RSS"
    return {"time": f"{proc}, {dtype}, {threads or '?'} threads, {company}, {batch}",
            "memory": f"{proc}, {dtype}, {batch}{holds}"}


def alike(gs: list[dict], kind: str) -> tuple[list[tuple[str, list[dict]]], list[dict]]:
    """The options of one family partitioned by how their `kind` of cost was measured: ([(conditions, options)],
    most options first; options whose own runs were measured differently, whose mean mixes conditions)."""
    parts: dict[str, list[dict]] = {}
    mixed = []
    for g in gs:
        conditions = (g.get("measured") or {}).get(kind) or ["unrecorded"]
        if len(conditions) == 1:
            parts.setdefault(conditions[0], []).append(g)
        else:
            mixed.append(g)
    return sorted(parts.items(), key=lambda kv: -len(kv[1])), mixed


def measured_alike(gs: list[dict], kinds: tuple[str, ...] = ("time", "memory")) -> bool:
    """Every option's `kinds` of cost measured under one set of conditions, the same for all (`alike`)."""
    return all(not mixed and len(parts) <= 1 for parts, mixed in (alike(gs, kind) for kind in kinds))


def flat_row(row: dict) -> dict:
    """One database row as flat columns (for `fewtune results` and the report)."""
    cfg = row.get("config") or {}
    evals = row.get("metrics") or {}
    cost = row.get("cost") or {}
    result = row.get("result") or {}
    ind, ood = split_roles(evals)
    primary = primary_metric(row)
    method_info = result.get("method_info") or {}
    out = {"config_hash": row["config_hash"], "status": row["status"], "label": row.get("label") or cfg.get("method"),
           "grid": row.get("grid"), "model": row.get("model"), "task": row.get("task"), "method": row.get("method"),
           "shots": row.get("shots"), "seed": row.get("seed"), "seed_free": seed_free_of(row),
           "examples_used": result.get("examples_used", row.get("shots")),
           "variant": variant_of(row) if (cfg or result) else None, "primary_metric": primary,
           "equivalence_margin": (result.get("task") or {}).get("equivalence_margin"),
           "id_split": ind, "ood_split": ood}
    for prefix, split in (("id", ind), ("ood", ood)):
        e = evals.get(split, {}) if split else {}
        for metric in (*METRICS, "n", "ece", "brier", "population"):
            out[f"{prefix}_{metric}"] = e.get(metric)
        out[f"{prefix}_primary"] = e.get(primary)
        baselines = e.get("baselines") or {}  # stored with the run, on its evaluation examples
        out[f"{prefix}_majority_{primary}"] = (baselines.get("majority") or {}).get(primary)
        out[f"{prefix}_majority_label"] = (baselines.get("majority") or {}).get("label")
        out[f"{prefix}_majority_accuracy"] = (baselines.get("majority") or {}).get("accuracy")
        out[f"{prefix}_uniform_{primary}"] = (baselines.get("uniform") or {}).get(primary)
    for key in COST_KEYS:
        out[key] = cost.get(key)
    if "demonstrations_dropped" in method_info:
        out["demonstrations_dropped"] = method_info["demonstrations_dropped"]
    # LM loss after - before adaptation on the retention text (nats/token); None where not measured (head methods)
    out["retention_delta"] = ((row.get("result") or {}).get("retention") or {}).get("delta")
    out.update({f"measured_{kind}": text for kind, text in measured_as(row).items()})  # measured_time, _memory
    out.update(attempts=row.get("attempts"), error=row.get("error"), started_at=row.get("started_at"),
               finished_at=row.get("finished_at"), log_path=row.get("log_path"),
               config=json.dumps(cfg, sort_keys=True))
    return out


def seed_free_of(row: dict) -> bool:
    """Whether the run's predictions cannot depend on its seeds, as recorded with it (result["seed_free"],
    Method.seed_free); a run recorded before the field was: zero-shot icl (icl with 0 shots), the one such option."""
    recorded = (row.get("result") or {}).get("seed_free")
    if recorded is not None:
        return bool(recorded)
    cfg = row.get("config") or {}
    return recorded_before_seed_free(row.get("method") or cfg.get("method"),
                                     row.get("shots") if row.get("shots") is not None else cfg.get("shots"))


def recorded_before_seed_free(method, shots) -> bool:
    """For runs recorded before `seed_free` was: zero-shot icl (icl with 0 shots), the one such option then."""
    return method == "icl" and shots == 0


# ----------------------------------------------------------------------------- options and their statistics
def predictions_reader(store):
    """`store.predictions`, each run's read once (the report and --until-resolved ask for a run many times)."""
    cache: dict[str, dict] = {}

    def predictions(key: str) -> dict:
        if key not in cache:
            cache[key] = store.predictions(key)
        return cache[key]
    return predictions


def group_runs(flat: list[dict], rows: list[dict], predictions) -> list[dict]:
    """Successful runs grouped into options: (task, model, label, shots, variant), with per-split metrics over seeds
    and their intervals. `predictions(config_hash)` returns a run's stored per-example predictions ({} if none).
    A label used with two variants gets the variant appended, so nothing is pooled silently."""
    by_hash = {r["config_hash"]: r for r in rows}
    groups: dict[tuple, list[dict]] = {}
    for f in flat:
        if f["status"] == "success":
            groups.setdefault((f["task"], f["model"], f["label"], f["shots"], f["variant"]), []).append(f)
    variants: dict[tuple, set] = {}
    for task, model, label, shots, variant in groups:
        variants.setdefault((task, model, label, shots), set()).add(variant)
    out = []
    for (task, model, label, shots, variant), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        name = label if len(variants[(task, model, label, shots)]) == 1 else f"{label} [{variant}]"
        first = runs[0]
        g = {"task": task, "model": model, "label": name, "method": first["method"], "shots": shots,
             "variant": variant, "seeds": [r["seed"] for r in runs], "n_runs": len(runs),
             "examples_used": _used(runs), "primary_metric": first["primary_metric"],
             "equivalence_margin": first.get("equivalence_margin"),
             "id_split": first["id_split"], "ood_split": first["ood_split"],
             "id_n": first["id_n"], "ood_n": first["ood_n"], "runs": [r["config_hash"] for r in runs],
             "metrics": [m for m in METRICS if first.get(f"id_{m}") is not None],
             "labels": list(((by_hash[first["config_hash"]].get("result") or {}).get("task") or {}).get("labels") or []),
             "preds": {}}
        for prefix, split in (("id", g["id_split"]), ("ood", g["ood_split"])):
            if split is None:
                continue
            g["preds"][prefix] = _aligned(runs, split, predictions)
            for metric in {*g["metrics"], g["primary_metric"]}:
                if metric in (g["primary_metric"], "accuracy"):
                    g[f"{prefix}_{metric}"] = option_estimate(g, prefix, metric, runs)
                else:  # shown as a mean only: no interval to compute
                    g[f"{prefix}_{metric}"] = stats.seed_only([r[f"{prefix}_{metric}"] for r in runs])
            g[f"{prefix}_primary"] = g[f"{prefix}_{g['primary_metric']}"]
            for cal in ("ece", "brier"):
                g[f"{prefix}_{cal}"] = _mean([r[f"{prefix}_{cal}"] for r in runs])
            g[f"{prefix}_population"] = first.get(f"{prefix}_population")  # the split's size (None: not recorded)
            g[f"{prefix}_majority"] = first.get(f"{prefix}_majority_{g['primary_metric']}")
            g[f"{prefix}_uniform"] = first.get(f"{prefix}_uniform_{g['primary_metric']}")
            for key in ("majority_label", "majority_accuracy"):
                g[f"{prefix}_{key}"] = first.get(f"{prefix}_{key}")
        # its runs' predictions cannot depend on the seed (zero-shot): one constant for every seed (stats.claims)
        g["seed_free"] = all(r.get("seed_free") for r in runs)
        g["measured"] = {kind: sorted({r[f"measured_{kind}"] for r in runs}) for kind in ("time", "memory")}
        g["cost_outliers"] = cost_outliers(runs)
        odd = {(o["config_hash"], key) for o in g["cost_outliers"] for key in o["costs"]}
        g["cost_range"] = {}
        for key in COST_KEYS:
            g[key] = (_median if key in MEDIAN_KEYS else _mean)([r[key] for r in runs])
            # what the same option's runs differ by, a flagged run left out: costs closer than this tie in budgets
            vals = [r[key] for r in runs if _finite(r[key]) and (r["config_hash"], key) not in odd]
            if len(vals) >= 2:
                g["cost_range"][key] = (min(vals), max(vals))
        out.append(g)
    out.sort(key=lambda g: (g["task"], g["model"], g["label"], g["shots"]))
    return out


def _used(runs) -> int | None:
    used = [r["examples_used"] for r in runs if r.get("examples_used") is not None]
    return max(used) if used else None


def cost_outliers(runs: list[dict]) -> list[dict]:
    """The runs of one option whose time is far from the option's median (OUTLIER_RATIO either way, by at least
    OUTLIER_MIN_SECONDS), when it has OUTLIER_MIN_RUNS runs with that time: [{"seed", "config_hash", "n_runs",
    "costs": {key: (the run's value, the option's median)}}], in seed order. A flagged run stays in the option (its
    predictions count); its costs do not move the option's, which are medians."""
    flagged: dict[str, dict] = {}
    for key in OUTLIER_KEYS:
        vals = [r[key] for r in runs if _finite(r[key])]
        if len(vals) < OUTLIER_MIN_RUNS:
            continue
        median = float(np.median(vals))
        if median <= 0:
            continue
        for r in runs:
            v = r[key]
            if not _finite(v) or abs(v - median) < OUTLIER_MIN_SECONDS:
                continue
            if v >= OUTLIER_RATIO * median or v <= median / OUTLIER_RATIO:
                entry = flagged.setdefault(r["config_hash"], {"seed": r["seed"], "config_hash": r["config_hash"],
                                                              "n_runs": len(vals), "costs": {}})
                entry["costs"][key] = (float(v), median)
    return sorted(flagged.values(), key=lambda o: [r["config_hash"] for r in runs].index(o["config_hash"]))


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _mean(values) -> float:
    v = [x for x in values if _finite(x)]
    return float(np.mean(v)) if v else math.nan


def _median(values) -> float:
    v = [x for x in values if _finite(x)]
    return float(np.median(v)) if v else math.nan


def _aligned(runs, split, predictions) -> dict | None:
    """{"seeds", "idx", "gold", "pred" [n_seeds, N]} for the runs' stored predictions on `split`, aligned by example
    id; None when any run has none (recorded before predictions were stored) or the runs saw different examples."""
    per_run = []
    for r in runs:
        p = predictions(r["config_hash"]).get(split)
        if p is None:
            return None
        per_run.append(p)
    idx = per_run[0]["idx"]
    if any(len(p["idx"]) != len(idx) or not np.array_equal(p["idx"], idx) for p in per_run):
        return None
    return {"seeds": [r["seed"] for r in runs], "idx": np.asarray(idx), "gold": np.asarray(per_run[0]["gold"]),
            "pred": np.stack([np.asarray(p["pred"]) for p in per_run]),
            "n_classes": per_run[0]["logprobs"].shape[1], "groups": per_run[0].get("groups")}


def option_estimate(g: dict, prefix: str, metric: str, runs) -> stats.Estimate:
    p = g["preds"].get(prefix)
    if p is None:  # legacy runs: the stored per-seed values only
        return stats.seed_only([r[f"{prefix}_{metric}"] for r in runs])
    return stats.estimate(p["gold"], p["pred"], None, p["n_classes"], metric)


def paired(a: dict, b: dict, prefix: str, metric: str) -> stats.Estimate | None:
    """A − B paired by data seed and by example (their common seeds, the same evaluation examples); None when
    they cannot be paired (no predictions stored, no common seed, or different evaluation examples)."""
    memo = a.setdefault("_paired", {})  # the report asks for the same pair at every budget level
    key = (id(b), prefix, metric)
    if key not in memo:
        memo[key] = _paired(a, b, prefix, metric)
    return memo[key]


def _paired(a: dict, b: dict, prefix: str, metric: str) -> stats.Estimate | None:
    pa, pb = a["preds"].get(prefix), b["preds"].get(prefix)
    if pa is None or pb is None or not np.array_equal(pa["idx"], pb["idx"]):
        return None
    common = sorted(set(pa["seeds"]) & set(pb["seeds"]))
    if not common:
        return None
    rows_a = [pa["seeds"].index(s) for s in common]
    rows_b = [pb["seeds"].index(s) for s in common]
    return stats.estimate(pa["gold"], pa["pred"][rows_a], pb["pred"][rows_b], pa["n_classes"], metric)


def versus_majority(g: dict, prefix: str, metric: str) -> stats.Estimate | None:
    """The option minus the majority-class baseline on the same examples (the baseline predicts the evaluation
    set's most frequent class everywhere), paired by example."""
    memo = g.setdefault("_paired", {})
    if ("majority", prefix, metric) not in memo:
        memo[("majority", prefix, metric)] = _versus_majority(g, prefix, metric)
    return memo[("majority", prefix, metric)]


def _versus_majority(g: dict, prefix: str, metric: str) -> stats.Estimate | None:
    p = g["preds"].get(prefix)
    if p is None:
        return None
    return stats.estimate(p["gold"], p["pred"], np.full_like(p["pred"], majority_class(p)), p["n_classes"], metric)


def majority_class(p: dict) -> int:
    """The evaluation set's most frequent class (as metrics.baselines picks it) from aligned predictions."""
    return int(np.bincount(p["gold"], minlength=p["n_classes"]).argmax())


def model_order(groups: list[dict]) -> list[tuple[str, str]]:
    """(task, model) pairs in report order."""
    seen = []
    for g in groups:
        if (g["task"], g["model"]) not in seen:
            seen.append((g["task"], g["model"]))
    return seen

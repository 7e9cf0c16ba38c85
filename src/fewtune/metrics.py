"""Classification metrics and the per-group breakdown (HANS heuristic x label)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def accuracy(gold, pred) -> float:
    gold, pred = np.asarray(gold), np.asarray(pred)
    return float((gold == pred).mean()) if len(gold) else float("nan")


def mcc(gold, pred, n_labels: int) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004); 0 when a marginal is constant, as sklearn does."""
    cm = confusion(gold, pred, n_labels).astype(np.float64)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = math.sqrt(max(s * s - (p * p).sum(), 0.0)) * math.sqrt(max(s * s - (t * t).sum(), 0.0))
    return float((c * s - (t * p).sum()) / denom) if denom else 0.0


def macro_f1(gold, pred, n_labels: int) -> float:
    cm = confusion(gold, pred, n_labels).astype(np.float64)
    f1s = []
    for k in range(n_labels):
        tp, fp, fn = cm[k, k], cm[:, k].sum() - cm[k, k], cm[k, :].sum() - cm[k, k]
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    return float(np.mean(f1s))


def confusion(gold, pred, n_labels: int) -> np.ndarray:
    cm = np.zeros((n_labels, n_labels), dtype=np.int64)
    for g, p in zip(gold, pred):
        cm[g, p] += 1
    return cm


def compute(gold, pred, labels, metrics=("accuracy", "macro_f1", "mcc"), groups=None) -> dict:
    """Metrics for one evaluation set; with `groups` (list of dicts) also per group value, per label, and both."""
    n_labels = len(labels)
    out = {"n": len(gold)}
    fns = {"accuracy": lambda g, p: accuracy(g, p), "mcc": lambda g, p: mcc(g, p, n_labels),
           "macro_f1": lambda g, p: macro_f1(g, p, n_labels)}
    for m in metrics:
        out[m] = fns[m](gold, pred)
    out["confusion"] = confusion(gold, pred, n_labels).tolist()  # rows: gold, columns: predicted
    out["by_label"] = {labels[k]: {"n": int(sum(1 for g in gold if g == k)),
                                   "accuracy": accuracy([g for g in gold if g == k], [p for g, p in zip(gold, pred) if g == k])}
                       for k in range(n_labels)}
    if groups and groups[0]:
        for key in groups[0]:
            cells = defaultdict(list)
            for g, p, grp in zip(gold, pred, groups):
                cells[grp[key]].append((g, p))
                cells[f"{grp[key]}/{labels[g]}"].append((g, p))
            out[f"by_{key}"] = {name: {"n": len(v), "accuracy": accuracy([a for a, _ in v], [b for _, b in v])}
                                for name, v in sorted(cells.items())}
    return out

"""Classification metrics: the registry (one entry per metric: how to compute it, its range, how it prints), the
per-group breakdown (HANS heuristic x label), calibration, and the baselines on the same examples."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


# ----------------------------------------------------------------------------- the metric registry
@dataclass(frozen=True)
class Metric:
    """A classification metric: one entry here is all fewtune needs to compute it per run, to give it a paired,
    seed-aware interval (fewtune.stats.stats, from its jackknife pseudo-values), to claim differences (fewtune.stats.compare),
    to print it and to accept it in a task file. Computed from confusion counts, vectorised over leading axes."""
    name: str                                   # the key task files use (lower case)
    display: str                                # in tables and sentences
    short: str                                  # on the console line
    of_confusion: Callable[[np.ndarray], np.ndarray]  # counts [..., C, C] (rows gold) -> values [...]
    lo: float                                   # the range it can take: a difference spans (lo − hi, hi − lo)
    hi: float
    percent: bool = False                       # printed in % (else as a coefficient with 3 decimals)
    higher_is_better: bool = True
    aliases: tuple[str, ...] = ()               # what other tools call it (suggested in errors)
    per_example: bool = False                   # a mean of per-example right/wrong: pseudo-values are exactly 1/0
    constant: float | None = None               # what predicting one class everywhere scores, whichever class
                                                # (MCC: 0); None where it depends on the data (accuracy)

    @property
    def unit(self) -> str:
        """What a difference of this metric is counted in, after the number: " points" for a percentage."""
        return " points" if self.percent else ""

    def value(self, gold, pred, n_labels: int) -> float:
        """The metric of one labelling (NaN for no examples)."""
        if len(gold) == 0:
            return float("nan")
        return float(self.of_confusion(confusion(gold, pred, n_labels).astype(np.float64)))


def _accuracy(cm: np.ndarray) -> np.ndarray:
    total = cm.sum((-1, -2))
    return np.divide(np.diagonal(cm, axis1=-2, axis2=-1).sum(-1), total, out=np.full_like(total, np.nan),
                     where=total > 0)


def _mcc(cm: np.ndarray) -> np.ndarray:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when a marginal is constant, as sklearn does."""
    total = cm.sum((-1, -2))
    t, p = cm.sum(-1), cm.sum(-2)
    c = np.diagonal(cm, axis1=-2, axis2=-1).sum(-1)
    num = c * total - (t * p).sum(-1)
    den = np.sqrt(np.maximum(total ** 2 - (p * p).sum(-1), 0)) * np.sqrt(np.maximum(total ** 2 - (t * t).sum(-1), 0))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _macro_f1(cm: np.ndarray) -> np.ndarray:
    t, p = cm.sum(-1), cm.sum(-2)
    den = t + p  # 2tp + fp + fn
    f1 = np.divide(2 * np.diagonal(cm, axis1=-2, axis2=-1), den, out=np.zeros_like(den), where=den > 0)
    return f1.mean(-1)


METRICS: dict[str, Metric] = {}


def register_metric(m: Metric) -> Metric:
    if m.name != m.name.lower() or not m.name.isidentifier():
        raise ValueError(f"metric name {m.name!r} must be a lower-case identifier")
    if m.name in METRICS:
        raise ValueError(f"metric {m.name!r} is registered twice")
    METRICS[m.name] = m
    return m


register_metric(Metric("accuracy", "accuracy", "acc", _accuracy, 0.0, 1.0, percent=True, aliases=("acc",),
                       per_example=True))
register_metric(Metric("mcc", "MCC", "mcc", _mcc, -1.0, 1.0, aliases=("matthews", "matthews_correlation"),
                       constant=0.0))
register_metric(Metric("macro_f1", "macro-F1", "macro-F1", _macro_f1, 0.0, 1.0, percent=True,
                       aliases=("f1", "macro-f1", "f1_macro", "macrof1")))


def accuracy(gold, pred) -> float:
    gold, pred = np.asarray(gold), np.asarray(pred)
    return float((gold == pred).mean()) if len(gold) else float("nan")


def mcc(gold, pred, n_labels: int) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004); 0 when a marginal is constant, as sklearn does."""
    return METRICS["mcc"].value(gold, pred, n_labels) if len(gold) else 0.0


def macro_f1(gold, pred, n_labels: int) -> float:
    return METRICS["macro_f1"].value(gold, pred, n_labels)


def confusion(gold, pred, n_labels: int) -> np.ndarray:
    """Counts [gold, predicted]."""
    cells = np.asarray(gold, dtype=np.int64) * n_labels + np.asarray(pred, dtype=np.int64)
    return np.bincount(cells, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def compute(gold, pred, labels, metrics=("accuracy", "macro_f1", "mcc"), groups=None) -> dict:
    """Metrics for one evaluation set; with `groups` (list of dicts) also per group value, per label, and both."""
    n_labels = len(labels)
    out = {"n": len(gold), **scores(gold, pred, n_labels, metrics)}
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


# ----------------------------------------------------------------------------- calibration
ECE_BINS = 15


def expected_calibration_error(gold, probs, bins: int = ECE_BINS) -> float:
    """ECE of the top-class probability: |accuracy - confidence| averaged over `bins` equal-width confidence
    bins, weighted by their share of examples (Guo et al. 2017). 0 = calibrated; always-50%-sure at 50% accuracy is 0."""
    gold, probs = np.asarray(gold), np.asarray(probs, dtype=np.float64)
    if len(gold) == 0:
        return float("nan")
    conf = probs.max(1)
    correct = (probs.argmax(1) == gold).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def brier(gold, probs) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - [gold = k])^2; 0 is perfect, 0.5 is a
    constant 50/50 on two classes."""
    gold, probs = np.asarray(gold), np.asarray(probs, dtype=np.float64)
    if len(gold) == 0:
        return float("nan")
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(gold)), gold] = 1.0
    return float(((probs - onehot) ** 2).sum(1).mean())


def calibration(gold, logprobs) -> dict:
    probs = np.exp(np.asarray(logprobs, dtype=np.float64))
    return {"ece": expected_calibration_error(gold, probs), "brier": brier(gold, probs)}


# ----------------------------------------------------------------------------- baselines
UNIFORM_DRAWS = 200  # random labellings averaged for the uniform-guess baseline (fixed seed: the same every time)


def baselines(gold, labels, metrics) -> dict:
    """The floor on these evaluation examples: `majority` predicts the evaluation set's most frequent class for
    every example (the best constant guess: accuracy = its share, MCC = 0); `uniform` guesses uniformly at random
    (the mean over UNIFORM_DRAWS seeded draws: accuracy ~ 1/C, MCC ~ 0)."""
    gold = np.asarray(gold, dtype=np.int64)
    n_labels = len(labels)
    if len(gold) == 0:
        return {}
    majority = int(np.bincount(gold, minlength=n_labels).argmax())
    out = {"majority": {"label": labels[majority], **scores(gold, np.full_like(gold, majority), n_labels, metrics)}}
    rng = np.random.default_rng(0)
    draws = [scores(gold, rng.integers(0, n_labels, len(gold)), n_labels, metrics) for _ in range(UNIFORM_DRAWS)]
    out["uniform"] = {m: float(np.mean([d[m] for d in draws])) for m in metrics}
    return out


def scores(gold, pred, n_labels: int, metrics) -> dict:
    """The named metrics of one labelling (`compute` and the baselines both use this)."""
    return {m: METRICS[m].value(gold, pred, n_labels) for m in metrics}


def evaluation(gold, pred, logprobs, labels, metrics=("accuracy", "macro_f1", "mcc"), groups=None) -> dict:
    """Everything stored for one evaluation split: the task's metrics (and per-group breakdown), calibration from
    the class log-probabilities, and the baselines on the same examples."""
    return {**compute(gold, pred, labels, metrics, groups), **calibration(gold, logprobs),
            "baselines": baselines(gold, labels, metrics)}

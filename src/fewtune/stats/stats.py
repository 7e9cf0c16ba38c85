"""Paired, seed-aware intervals for a task's metric, from the stored per-example predictions.

Under one data seed every option trains on the same sample and is scored on the same evaluation examples, and
the evaluation examples are the same under every seed. So an estimate of "option A's metric" or of "A minus B"
has two sources of error, and the interval accounts for both (docs/statistics.md explains it with the algebra):

- **training instability** (which sample, which initialisation): the per-seed values d_s differ from seed to
  seed. Its share of the variance of the mean is V_seed = s²(d_s) / n, estimated from the n seeds, so it carries
  n − 1 degrees of freedom (none with one seed);
- **evaluation sampling** (which N examples were scored): the examples are shared by all seeds, so this error does
  not average out over seeds. Its share V_examples comes from the two-way (seed × example) analysis of variance of
  per-example values, (MS_examples − MS_residual) / (n·N), which does not count the per-seed noise twice: for
  accuracy the values are 1/0 (right/wrong), for MCC and macro-F1, which do not split into per-example terms,
  their jackknife pseudo-values (the same decomposition, linearised). Pairing: both options' values are taken
  on the same examples and seeds, and differenced there.

The half-width is sqrt(t(n−1)² · V_seed + t(N−1)² · V_examples): each part is widened by the t quantile of its own
degrees of freedom. With 2-3 seeds the seed part's quantile is large (12.7, 4.3): two or three runs cannot tell how
unstable training is, and a pooled Welch-Satterthwaite t under-covers there (89% measured at 2 seeds). With one
seed only the evaluation sampling is covered: the interval says nothing about training instability, and the report
says so. Coverage is checked by simulation in tests/test_stats.py: runs with a known true difference, at least 93%
of the 95% intervals cover it at 1, 2, 3 and 5 seeds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

from .metrics import METRICS

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A metric (or a paired difference of a metric) over seeds and examples, with its interval."""
    value: float             # mean over seeds of the per-seed metric (or difference)
    lo: float
    hi: float
    se: float                # half-width / z(0.975): the normal standard error the interval amounts to
    df: float                # of the seed part: n_seeds - 1
    n_seeds: int
    n_examples: int
    seed_var: float          # V_seed: training instability's share of the variance of `value` (0 with one seed)
    example_var: float       # V_examples: evaluation sampling's share

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def eval_noise_only(self) -> bool:
        """One seed: the interval covers evaluation-sample noise, not training instability."""
        return self.n_seeds < 2


NAN_ESTIMATE = Estimate(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, math.nan, math.nan)


# ----------------------------------------------------------------------------- metrics from confusion counts
def from_confusion(cm: np.ndarray, metric: str) -> np.ndarray:
    """`metric` of confusion count arrays [..., C, C] (rows gold, columns predicted), vectorised over the leading
    axes: the registry's definition (fewtune.stats.metrics.METRICS)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    return METRICS[metric].of_confusion(np.asarray(cm, dtype=np.float64))


def metric_value(gold, pred, n_classes: int, metric: str) -> float:
    cells = np.asarray(gold, dtype=np.int64) * n_classes + np.asarray(pred, dtype=np.int64)
    cm = np.bincount(cells, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return float(from_confusion(cm, metric))


# ----------------------------------------------------------------------------- the estimate
def estimate(gold, preds_a, preds_b=None, n_classes: int = 2, metric: str = "accuracy",
             confidence: float = None) -> Estimate:
    """Metric of option A, or the paired difference A − B, with its `confidence` interval [CONFIDENCE].

    `gold`: [N] labels of the evaluation examples (the same for every seed). `preds_a`, `preds_b`: [n_seeds, N]
    predictions, row s of both under data seed s, column i for example i. The example variance comes from the
    two-way (seed × example) analysis of variance of the per-example jackknife pseudo-values (exact for accuracy,
    where a pseudo-value is 1/0 for right/wrong), which does not count the per-seed noise twice.
    """
    confidence = CONFIDENCE if confidence is None else confidence
    gold = np.asarray(gold, dtype=np.int64)
    a = np.atleast_2d(np.asarray(preds_a, dtype=np.int64))
    b = None if preds_b is None else np.atleast_2d(np.asarray(preds_b, dtype=np.int64))
    n, big_n = a.shape
    if big_n == 0 or n == 0:
        return NAN_ESTIMATE
    if a.shape[1] != len(gold) or (b is not None and b.shape != a.shape):
        raise ValueError(f"shapes do not pair: gold {gold.shape}, A {a.shape}, B {None if b is None else b.shape}")
    per_seed = np.array([metric_value(gold, a[s], n_classes, metric) for s in range(n)])
    d = pseudo_values(gold, a, n_classes, metric)
    if b is not None:
        per_seed = per_seed - np.array([metric_value(gold, b[s], n_classes, metric) for s in range(n)])
        d = d - pseudo_values(gold, b, n_classes, metric)
    value = float(per_seed.mean())
    seed_var = float(per_seed.var(ddof=1) / n) if n > 1 else 0.0
    example_var = anova_example_var(d)
    return clip(_interval(value, seed_var, example_var, n, big_n, confidence), metric, difference=b is not None)


def pseudo_values(gold, pred, n_classes: int, metric: str) -> np.ndarray:
    """Jackknife pseudo-values [n_seeds, N]: N·m − (N−1)·m(without example i), per seed. Their mean over the
    examples is the (bias-corrected) metric and their variance / N its jackknife variance; for accuracy they are
    exactly 1/0 for right/wrong. Leaving one example out changes one confusion cell, so only C² leave-one-out values
    are computed per seed."""
    gold = np.asarray(gold, dtype=np.int64)
    pred = np.atleast_2d(np.asarray(pred, dtype=np.int64))
    n, big_n = pred.shape
    if METRICS[metric].per_example:  # a mean of right/wrong: the pseudo-values are exactly 1/0
        return (pred == gold[None, :]).astype(np.float64)
    cc = n_classes * n_classes
    cells = gold[None, :] * n_classes + pred  # [n, N]: each example's confusion cell
    counts = np.stack([np.bincount(c, minlength=cc) for c in cells]).astype(np.float64)  # [n, C*C]
    full = from_confusion(counts.reshape(n, n_classes, n_classes), metric)  # [n]
    loo = counts[:, None, :] - np.eye(cc)[None, :, :]  # [n, C*C (cell removed), C*C]
    loo_values = from_confusion(np.maximum(loo, 0).reshape(n, cc, n_classes, n_classes), metric)  # [n, C*C]
    return big_n * full[:, None] - (big_n - 1) * np.take_along_axis(loo_values, cells, axis=1)


def clip(est: Estimate, metric: str, difference: bool) -> Estimate:
    """Bounds cut to what the metric can be (a wide 2-seed interval for MCC would reach past ±1): the parameter
    lies in that range, so cutting there loses no coverage."""
    lo, hi = (METRICS[metric].lo, METRICS[metric].hi) if metric in METRICS else (-math.inf, math.inf)
    if difference:
        lo, hi = -(hi - lo), hi - lo
    return dataclasses.replace(est, lo=max(est.lo, lo), hi=min(est.hi, hi))


def anova_example_var(d: np.ndarray) -> float:
    """Evaluation sampling's share of the variance of the seed-averaged mean of D[s, i] (per-example values, or
    the difference of two options'), from the two-way random-effects decomposition: (MS_examples − MS_residual) /
    (n·N); with one seed Var_i(D) / N (that seed's evaluation noise is all there is to see)."""
    d = np.atleast_2d(np.asarray(d, dtype=np.float64))
    n, big_n = d.shape
    if big_n < 2:
        return 0.0
    h = d.mean(0)  # per example, over seeds
    if n == 1:
        return float(h.var(ddof=1) / big_n)
    ms_examples = n * h.var(ddof=1)
    resid = d - d.mean(1, keepdims=True) - h[None, :] + d.mean()
    ms_resid = float((resid ** 2).sum() / ((n - 1) * (big_n - 1)))
    return float(max(0.0, ms_examples - ms_resid) / (n * big_n))


def _interval(value: float, seed_var: float, example_var: float, n: int, big_n: int,
              confidence: float = CONFIDENCE) -> Estimate:
    t_seed = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) if n > 1 else 0.0
    t_examples = float(_scipy_stats.t.ppf(0.5 + confidence / 2, max(big_n - 1, 1))) if big_n > 0 else 0.0
    half = math.sqrt(t_seed ** 2 * seed_var + t_examples ** 2 * example_var)
    z = float(_scipy_stats.norm.ppf(0.5 + confidence / 2))
    se = half / z  # the normal standard error the interval amounts to
    return Estimate(value, value - half, value + half, se, float(n - 1), n, big_n, seed_var, example_var)


def seed_only(values) -> Estimate:
    """For runs recorded without per-example predictions: a t interval over the per-seed values only
    (evaluation sampling not covered); NaN bounds with one seed."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return NAN_ESTIMATE
    if len(v) < 2:
        return Estimate(float(v[0]), math.nan, math.nan, math.nan, math.nan, 1, 0, math.nan, math.nan)
    return _interval(float(v.mean()), float(v.var(ddof=1) / len(v)), 0.0, len(v), 0)

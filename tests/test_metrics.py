"""Metrics against values worked out by hand, and the per-group breakdown used for HANS."""

import math

import pytest

from fewtune.stats import metrics

GOLD = [1, 1, 1, 0, 0]
PRED = [1, 1, 0, 0, 1]   # TP 2, FN 1, TN 1, FP 1


def test_accuracy_mcc_macro_f1_by_hand():
    assert metrics.accuracy(GOLD, PRED) == pytest.approx(3 / 5)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2)
    assert metrics.mcc(GOLD, PRED, 2) == pytest.approx(1 / 6)
    # F1(yes) = 2*2 / (2*2 + 1 + 1) = 2/3; F1(no) = 2*1 / (2*1 + 1 + 1) = 1/2
    assert metrics.macro_f1(GOLD, PRED, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert metrics.confusion(GOLD, PRED, 2).tolist() == [[1, 1], [1, 2]]


@pytest.mark.parametrize("pred, expected", [(GOLD, 1.0), ([1 - g for g in GOLD], -1.0), ([1] * 5, 0.0), ([0] * 5, 0.0)])
def test_mcc_extremes(pred, expected):
    assert metrics.mcc(GOLD, pred, 2) == pytest.approx(expected)


def test_compute_breaks_down_by_group_and_label():
    groups = [{"heuristic": h} for h in ("a", "a", "b", "b", "b")]
    out = metrics.compute(GOLD, PRED, ("no", "yes"), ("accuracy", "mcc"), groups)
    assert out["n"] == 5 and "macro_f1" not in out
    assert out["by_label"] == {"no": {"n": 2, "accuracy": 0.5}, "yes": {"n": 3, "accuracy": pytest.approx(2 / 3)}}
    by = out["by_heuristic"]
    assert by["a"] == {"n": 2, "accuracy": 1.0} and by["b"]["n"] == 3 and by["b"]["accuracy"] == pytest.approx(1 / 3)
    assert by["b/no"] == {"n": 2, "accuracy": 0.5} and by["b/yes"] == {"n": 1, "accuracy": 0.0}
    assert "by_heuristic" not in metrics.compute(GOLD, PRED, ("no", "yes"), groups=[{}] * 5)


def test_empty_accuracy_is_nan():
    assert math.isnan(metrics.accuracy([], []))


def test_a_metric_is_one_registry_entry():
    """Adding a metric is one `register_metric` call: task files accept it, runs compute it, the statistics give it a
    paired interval (from its jackknife pseudo-values), the claim procedure compares options on it, tables print it."""
    import numpy as np

    from fewtune import tasks
    from fewtune.stats import compare, fmt, stats
    from fewtune.stats.metrics import METRICS, Metric, register_metric

    def balanced_accuracy(cm):  # mean recall over classes
        recall = np.divide(np.diagonal(cm, axis1=-2, axis2=-1), cm.sum(-1), out=np.zeros(cm.shape[:-1]),
                           where=cm.sum(-1) > 0)
        return recall.mean(-1)
    register_metric(Metric("balanced_accuracy", "balanced accuracy", "bal-acc", balanced_accuracy, 0.0, 1.0,
                           percent=True))
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_metric(METRICS["balanced_accuracy"])
        rng = np.random.default_rng(0)
        gold = rng.integers(0, 2, 300)
        pred = np.where(rng.random((4, 300)) < 0.8, gold, 1 - gold)  # 4 seeds: claims need them
        assert metrics.scores(gold, pred[0], 2, ["balanced_accuracy"])["balanced_accuracy"] == pytest.approx(
            np.mean([(pred[0][gold == k] == k).mean() for k in (0, 1)]))
        est = stats.estimate(gold, pred, None, 2, "balanced_accuracy")
        assert est.lo < est.value < est.hi <= 1.0
        v = compare.family(gold, [compare.OptionRuns("a", (0, 1, 2, 3), pred),
                                  compare.OptionRuns("b", (0, 1, 2, 3), 1 - pred)], 2, "balanced_accuracy")
        assert v.worse == {"b": "a"}
        assert fmt.METRIC_NAMES["balanced_accuracy"] == "balanced accuracy" and "balanced_accuracy" in fmt.PERCENT
        assert fmt.scale_for("balanced_accuracy")(0.5) == "50.0"
        raw = {"name": "t", "labels": ["no", "yes"], "fields": ["text"], "train": "s", "in_domain": "s",
               "metrics": ["accuracy", "balanced_accuracy"], "primary_metric": "balanced_accuracy",
               "patterns": [{"template": "{text}?", "verbalizer": [" No", " Yes"]}],
               "splits": {"s": {"local": {"path": "x.tsv"}, "columns": {"text": 0, "label": 1}}}}
        assert tasks.task_from_dict(raw).primary_metric == "balanced_accuracy"
    finally:
        METRICS.pop("balanced_accuracy", None)

"""What a method costs to *use*: per-prediction cost, break-even against in-context learning, and budgets that
include a prediction volume or a latency limit. Every number comes from the stored cost fields of the runs
(runner.use_cost: measured on the evaluation pass, same hardware, precision and batch size), each option's the median
over its runs (fewtune.stats.options.MEDIAN_KEYS: one disturbed run does not move a break-even). Two options' times are
compared only when both were measured alike (fewtune.stats.options.measured_as)."""

from __future__ import annotations

import math

from .data import measured_alike, seconds


def per_prediction_s(g: dict) -> float:
    v = g.get("predict_seconds_per_1k")
    return v / 1000 if v is not None and not math.isnan(v) else math.nan


def break_even(trained: dict, reference: dict) -> float:
    """Predictions after which `trained` (training once, then cheaper predictions) costs less compute time in total
    than `reference` (an icl option: no training, dearer predictions): n* = (train_T − train_R) / (per_R − per_T).
    inf when the trained option is not cheaper per prediction; 0 when it also trained for free."""
    per_t, per_r = per_prediction_s(trained), per_prediction_s(reference)
    train_t = trained.get("train_seconds") or 0.0
    train_r = reference.get("train_seconds") or 0.0
    if any(math.isnan(x) for x in (per_t, per_r, train_t, train_r)):
        return math.nan
    if per_r <= per_t:
        return math.inf if train_t > train_r else 0.0
    return max(0.0, (train_t - train_r) / (per_r - per_t))


def count(n: float) -> str:
    if math.isnan(n):
        return "–"
    if math.isinf(n):
        return "never"
    n = math.ceil(n)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def references(gs: list[dict]) -> list[dict]:
    """The icl options of one task x model, fewest demonstrations first (zero-shot, if it ran, comes first)."""
    return sorted((g for g in gs if g["method"] == "icl" and not math.isnan(per_prediction_s(g))),
                  key=lambda g: (g.get("examples_used") or 0, g["shots"]))


def break_even_table(gs: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    refs = references(gs)
    trained = [g for g in gs if g["method"] != "icl" and not math.isnan(per_prediction_s(g))]
    if not refs or not trained:
        return None
    headers = ["method", "shots", "train s", "ms / prediction"]
    for r in refs:
        headers.append(f"vs {r['label']} ({r.get('examples_used', r['shots'])} demos, {1000 * per_prediction_s(r):.1f} ms)")
    rows = []
    for g in trained:
        row = [g["label"], str(g["shots"]), seconds(g.get("train_seconds")), f"{1000 * per_prediction_s(g):.1f}"]
        row += [count(break_even(g, r)) if measured_alike([g, r], ("time",)) else "not timed alike" for r in refs]
        rows.append(row)
    return headers, rows


def with_volume(gs: list[dict], volume: float | None) -> None:
    """Add `use_seconds`: training plus `volume` predictions, in seconds of compute, to every option."""
    for g in gs:
        per = per_prediction_s(g)
        g["use_seconds"] = (g.get("train_seconds") or 0.0) + volume * per if volume and not math.isnan(per) else math.nan


def within_latency(gs: list[dict], max_ms: float | None) -> tuple[list[dict], list[dict]]:
    """(options whose measured time per prediction is within `max_ms`, the others)."""
    if not max_ms:
        return gs, []
    ok = [g for g in gs if not math.isnan(per_prediction_s(g)) and 1000 * per_prediction_s(g) <= max_ms]
    return ok, [g for g in gs if g not in ok]


def within_retention(gs: list[dict], max_delta: float | None) -> tuple[list[dict], list[dict]]:
    """(options whose general-text LM loss rose by at most `max_delta` nats/token, the others: over the limit or not
    measured, e.g. ft, whose new head leaves no LM to measure)."""
    if max_delta is None:
        return gs, []
    ok = [g for g in gs if g.get("retention_delta") is not None and not math.isnan(g["retention_delta"])
          and g["retention_delta"] <= max_delta]
    return ok, [g for g in gs if g not in ok]

"""How numbers print, in one place, so the report, `--until-resolved` and the tests read the same digits:
accuracy and macro-F1 in %, MCC as a coefficient, intervals in brackets († one seed: evaluation noise only)."""

from __future__ import annotations

import math

from .metrics import METRICS


class _Percent:
    """The metrics printed in % (the others as coefficients), read from the registry when asked."""
    def __contains__(self, name) -> bool:
        return name in METRICS and METRICS[name].percent


class _Names(dict):
    """Metric name -> how tables and sentences call it, read from the registry when asked."""
    def __missing__(self, name):
        return METRICS[name].display

    def get(self, name, default=None):
        return METRICS[name].display if name in METRICS else default


PERCENT = _Percent()
METRIC_NAMES = _Names()


def pct(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def num(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def scale_for(metric: str):
    """How a metric prints: accuracy and macro-F1 in %, MCC as a coefficient with 3 decimals."""
    return pct if metric in PERCENT else num


def value(est, metric: str) -> str:
    if est is None or math.isnan(est.value):
        return "–"
    return scale_for(metric)(est.value)


def interval(est, metric: str) -> str:
    if est is None or math.isnan(est.lo):
        return "–"
    f = scale_for(metric)
    return f"[{f(est.lo)}, {f(est.hi)}]" + ("†" if getattr(est, "eval_noise_only", False) else "")


def with_interval(est, metric: str) -> str:
    v, i = value(est, metric), interval(est, metric)
    return v if i == "–" else f"{v} {i}"


def signed(est, metric: str) -> str:
    if est is None or math.isnan(est.value):
        return "–"
    f = scale_for(metric)
    sign = lambda x: ("+" if x >= 0 else "") + f(x)  # noqa: E731
    body = sign(est.value)
    if not math.isnan(est.lo):
        body += f" [{sign(est.lo)}, {sign(est.hi)}]" + ("†" if getattr(est, "eval_noise_only", False) else "")
    return body


def seconds(x) -> str:
    return "–" if x is None or math.isnan(x) else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def mib(x) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.0f}"


def _largest_unit(x, units, digits: int, sep: str, base: str) -> str:
    """x in the largest of `units` ((name, size), largest first) it reaches; below them all, plain with `base`."""
    if x is None or math.isnan(x):
        return "–"
    for unit, n in units:
        if x >= n:
            return f"{x / n:.{digits}f}{sep}{unit}"
    return f"{x:.0f}{sep if base else ''}{base}"


def size(x) -> str:
    """Bytes as B/kB/MB/GB (decimal)."""
    return _largest_unit(x, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)), 1, " ", "B")


def params(x) -> str:
    """A parameter count as k/M/G."""
    return _largest_unit(x, (("G", 1e9), ("M", 1e6), ("k", 1e3)), 2, "", "")


# --- the console lines of a run (`fewtune run`, and the grid's line per finished cell)
class _Short(dict):
    def __missing__(self, name):
        return METRICS[name].short if name in METRICS else name

    def get(self, name, default=None):
        return METRICS[name].short if name in METRICS else default


SHORT_NAMES = _Short()


def task_name(result: dict) -> str:
    """The task's name as recorded (a user task's `name`, not the path of its file)."""
    return (result.get("task") or {}).get("name") or result["config"]["task"]


def brief(result: dict) -> str:
    """One run in a few words, for the grid's per-run line: the task's name and its primary metric per split."""
    primary = (result.get("task") or {}).get("primary_metric") or "accuracy"
    parts = [f"{name} {SHORT_NAMES.get(primary, primary)} {e[primary]:.3f}"
             for name, e in (result.get("evals") or {}).items()
             if isinstance(e, dict) and isinstance(e.get(primary), (int, float))]
    return f"{task_name(result)}: " + (", ".join(parts) or "done") if parts else "done"


def summary_line(result: dict) -> str:
    """The console line of `fewtune run`: every metric the task lists, its primary metric first and marked."""
    primary = (result.get("task") or {}).get("primary_metric")
    parts = []
    for name, e in result["evals"].items():
        # every metric the task lists (an eval holds exactly those; see metrics.compute), the primary one first
        keys = sorted((k for k in e if k in METRICS), key=lambda k: k != primary)
        shown = " ".join(f"{SHORT_NAMES[k]} {e[k]:.3f}" + (" (primary)" if k == primary else "") for k in keys)
        parts.append(f"{name}: {shown} (n={e['n']})")
    c = result["cost"]
    return (f"{result['config']['method']} on {task_name(result)}, {result['config']['shots']} shots, seed "
            f"{result['config']['seed']}: " + "; ".join(parts) +
            f" | train {c['train_seconds']:.1f}s eval {c['eval_seconds']:.1f}s peak {c['peak_memory_mib']:.0f} MiB")

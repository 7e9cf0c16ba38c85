"""The report's figures, drawn with matplotlib's Agg backend from the grouped numbers (report.data).

Each figure is written as PNG and SVG under <out>/figures; the HTML report embeds the SVG.
Error bars and bands are the paired, seed-aware 95% intervals of fewtune.stats.stats (one seed: evaluation noise only).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .budget import pareto_front  # noqa: E402
from .data import COST_KIND, METRIC_NAMES, PERCENT, alike  # noqa: E402

# svg.fonttype none: text stays text (the browser's sans-serif draws it), an SVG half the bytes of glyph outlines
plt.rcParams.update({"svg.hashsalt": "fewtune", "svg.fonttype": "none", "font.size": 9, "axes.grid": True,
                     "grid.alpha": 0.3})
MARKERS = "osD^v<>PX*"


SLUG_MAX = 60  # characters per name part: a figure file name (kind + task + model) stays far below 255 bytes


def key_slug(text: str) -> str:
    """The plain file-name form of a name fewtune itself chooses (a metric or cost key: `train_seconds` ->
    `train-seconds`). Not for names a user gives (tasks, models): it maps different names to one."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def slug(text: str) -> str:
    """A file-name part for a user's name (task, model), distinct for distinct texts: where the plain form loses
    something (case, `_` vs `-`, a path's `/`) or is cut to SLUG_MAX, a short hash of the full text is appended,
    so `my_task` and `my-task` never share (and overwrite) a figure file."""
    plain = key_slug(text)
    if plain == text and len(plain) <= SLUG_MAX:
        return plain
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{plain[:SLUG_MAX].rstrip('-.')}-{digest}".lstrip("-")


def colors(labels) -> dict[str, tuple]:
    """One colour per method label, the same in every figure of a report."""
    labels = sorted(set(labels))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def save(fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=130, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return name


def finite(*xs) -> bool:
    return all(x is not None and not math.isnan(x) for x in xs)


def _axis(g: dict):
    """(scale, unit) for the primary metric: accuracy/macro-F1 in %, MCC as a coefficient."""
    return (100.0, " %") if g["primary_metric"] in PERCENT else (1.0, "")


def _est(g: dict, prefix: str):
    return g.get(f"{prefix}_primary")


def _panels(prefixes):
    return [(p, "in-domain" if p == "id" else "out-of-domain") for p in prefixes]


def _panel_figure(gs: list[dict], prefixes):
    """(scale, unit, metric name, figure, axes): one panel per split, sharing the metric's axis."""
    k, unit = _axis(gs[0])
    mname = METRIC_NAMES[gs[0]["primary_metric"]]
    fig, axes = plt.subplots(1, len(prefixes), figsize=(5 * len(prefixes), 3.8), sharey=True, squeeze=False)
    return k, unit, mname, fig, axes


def metric_vs_shots(groups: list[dict], task: str, model: str, out: Path, color: dict, prefixes=("id", "ood")) -> str | None:
    gs = [g for g in groups if g["task"] == task and g["model"] == model]
    if not any(len({g["shots"] for g in gs if g["label"] == label}) >= 2 for label in {g["label"] for g in gs}):
        return None  # no method at two sample sizes: there is no line to draw
    k, unit, mname, fig, axes = _panel_figure(gs, prefixes)
    for ax, (prefix, title) in zip(axes[0], _panels(prefixes)):
        labels = sorted({g["label"] for g in gs})
        for j, label in enumerate(labels):
            line = sorted((g for g in gs if g["label"] == label and _est(g, prefix) is not None
                           and finite(_est(g, prefix).value)), key=lambda g: g["shots"])
            if not line:
                continue
            off = j - (len(labels) - 1) / 2  # dodge options at the same sample size so their bars stay apart
            dodge = lambda v: v * 2 ** (0.04 * off) if v > 0 else v + 0.3 * off  # noqa: E731
            x = [dodge(g["shots"]) for g in line]
            ax.plot(x, [k * _est(g, prefix).value for g in line], marker="o", ms=4, color=color[label], label=label)
            band = [(g["shots"], k * _est(g, prefix).lo, k * _est(g, prefix).hi) for g in line if finite(_est(g, prefix).lo)]
            if band:
                ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                                color=color[label], alpha=0.15, lw=0)
                mids = [k * _est(g, prefix).value for g in line if finite(_est(g, prefix).lo)]
                ax.errorbar([dodge(b[0]) for b in band], mids, yerr=[[m - b[1] for m, b in zip(mids, band)],
                                                             [b[2] - m for m, b in zip(mids, band)]],
                            fmt="none", ecolor=color[label], elinewidth=0.8, capsize=2)
        floor = next((g.get(f"{prefix}_majority") for g in gs if g.get(f"{prefix}_majority") is not None), None)
        if floor is not None:  # the majority-class baseline on the same examples: the floor to beat
            ax.axhline(k * floor, color="grey", ls="--", lw=0.9, label="majority class")
        shots = sorted({g["shots"] for g in gs})
        if shots and min(shots) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(shots) / 1.6, max(shots) * 1.6)
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.set_title(f"{title} ({gs[0][f'{prefix}_split']})")
        ax.set_xlabel("training examples (shots)")
    axes[0, 0].set_ylabel(f"{mname}{unit}")
    if axes[0, 0].get_legend_handles_labels()[0]:  # on the in-domain panel (an empty OOD panel has no artists)
        axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{task} / {model}: {mname} vs sample size (bars: 95% intervals; dashed: majority class)")
    return save(fig, out, f"{key_slug(mname)}-vs-shots-{slug(task)}-{slug(model)}")


def id_vs_ood(groups: list[dict], task: str, out: Path, color: dict) -> str | None:
    gs = [g for g in groups if g["task"] == task and _est(g, "id") is not None and _est(g, "ood") is not None
          and finite(_est(g, "id").value, _est(g, "ood").value)]
    if not gs:
        return None
    k, unit = _axis(gs[0])
    mname = METRIC_NAMES[gs[0]["primary_metric"]]
    models = sorted({g["model"] for g in gs})
    fig, ax = plt.subplots(figsize=(6, 5))
    for g in gs:
        a, b = _est(g, "id"), _est(g, "ood")
        x, y = k * a.value, k * b.value
        xerr = yerr = None
        if finite(a.lo, b.lo):
            xerr = [[x - k * a.lo], [k * a.hi - x]]
            yerr = [[y - k * b.lo], [k * b.hi - y]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=MARKERS[models.index(g["model"]) % len(MARKERS)],
                    color=color[g["label"]], ms=5, elinewidth=0.6)
        ax.annotate(str(g["shots"]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=0.8)
    for label in sorted({g["label"] for g in gs}):
        ax.plot([], [], "o", color=color[label], label=label)
    for i, m in enumerate(models):
        ax.plot([], [], MARKERS[i % len(MARKERS)], color="black", mfc="none", label=m)
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"in-domain {mname}{unit} ({gs[0]['id_split']})")
    ax.set_ylabel(f"out-of-domain {mname}{unit} ({gs[0]['ood_split']})")
    ax.set_title(f"{task}: in-domain vs out-of-domain (numbers: shots; dashed: equal)")
    return save(fig, out, f"id-vs-ood-{slug(task)}")


def metric_vs_cost(groups: list[dict], task: str, model: str, cost: str, xlabel: str, out: Path,
                   color: dict, prefixes=("id", "ood")) -> str | None:
    gs = [g for g in groups if g["task"] == task and g["model"] == model and finite(g.get(cost))]
    if not gs:
        return None
    k, unit, mname, fig, axes = _panel_figure(gs, prefixes)
    parts, mixed = alike(gs, COST_KIND[cost]) if cost in COST_KIND else ([(None, gs)], [])
    alike_gs = parts[0][1] if parts else []  # the front only among options measured alike (the most of them)
    labels = []  # placed once both panels are drawn: they share the metric's axis
    for ax, (prefix, title) in zip(axes[0], _panels(prefixes)):
        for g in gs:
            if _est(g, prefix) is not None and finite(_est(g, prefix).value):
                ax.scatter(g[cost], k * _est(g, prefix).value, color=color[g["label"]], s=18, zorder=3,
                           marker="o" if g in alike_gs else "x")
        front = pareto_front(alike_gs, cost, prefix)
        if front:
            ax.step([g[cost] for g in front], [k * _est(g, prefix).value for g in front], where="post",
                    color="black", lw=1, zorder=2)
            ax.scatter([g[cost] for g in front], [k * _est(g, prefix).value for g in front], s=70,
                       facecolors="none", edgecolors="black", zorder=4, label="Pareto front")
        if cost == "train_seconds" and min(g[cost] for g in gs) <= 0:
            ax.set_xscale("symlog", linthresh=1.0)  # icl trains for 0 s
        elif max(g[cost] for g in gs) > 10 * max(min(g[cost] for g in gs), 1e-9):
            ax.set_xscale("log")
        labels.append((ax, [(f"{g['label']} ({g['shots']})", g[cost], k * _est(g, prefix).value) for g in front]))
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    axes[0, 0].set_ylabel(f"{mname}{unit}")
    for label in sorted({g["label"] for g in gs}):
        axes[0, 0].scatter([], [], color=color[label], s=18, label=label)
    axes[0, 0].legend(fontsize=7, loc="best")
    for ax, points in labels:
        label_front(ax, points)
    differ = len(parts) > 1 or mixed
    fig.suptitle(f"{task} / {model}: {mname} vs {xlabel} (ringed: Pareto front"
                 + ("; x: measured differently, left out of the front)" if differ else ")"))
    return save(fig, out, f"{key_slug(mname)}-vs-{key_slug(cost)}-{slug(task)}-{slug(model)}")


LABEL_PT = 6  # the front's label size, points; labels stay 1.4 lines apart


def label_front(ax, points: list[tuple[str, float, float]]) -> None:
    """Label (text, x, y) points beside them (to the right, or to the left in the axes' right half, so a label stays
    inside its panel), moved apart vertically where they would overlap, with a leader line to a label that moved."""
    if not points:
        return
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before reading positions
    to_pt = 72 / ax.figure.dpi
    at = [ax.transData.transform((x, y)) for _, x, y in points]
    middle = ax.transAxes.transform((0.5, 0.5))[0]
    ys = spread([py * to_pt for _, py in at], 1.4 * LABEL_PT)
    for (text, x, y), (px, py), ly in zip(points, at, ys):
        dy, left = ly - py * to_pt, px > middle
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(-7 if left else 7, dy), fontsize=LABEL_PT,
                    va="center", ha="right" if left else "left",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="grey") if abs(dy) > 1 else None)


def group_bars(runs: list[dict], model: str, out: Path, color: dict, split: str = "hans",
               key: str = "heuristic") -> str | None:
    """Per group (the task's group_by column `key`, e.g. HANS's heuristic) x gold label accuracy on `split`, mean over
    seeds, one panel per sample size. `runs`: successful database rows whose metrics have split.by_<key>."""
    rows = [r for r in runs if r["model"] == model]
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r["metrics"][split][f"by_{key}"] if "/" in k})
    shots = sorted({r["shots"] for r in rows})
    labels = sorted({r["label"] for r in rows})
    fig, axes = plt.subplots(len(shots), 1, figsize=(10, 2.6 * len(shots)), squeeze=False, sharey=True)
    width = 0.8 / max(len(labels), 1)
    for ax, n in zip(axes[:, 0], shots):
        for j, label in enumerate(labels):
            sel = [r for r in rows if r["shots"] == n and r["label"] == label]
            if not sel:
                continue
            heights = []
            for k in keys:
                vals = [r["metrics"][split][f"by_{key}"].get(k, {}).get("accuracy") for r in sel]
                vals = [v for v in vals if v is not None]
                heights.append(100 * sum(vals) / len(vals) if vals else 0.0)
            ax.bar([i + j * width - 0.4 + width / 2 for i in range(len(keys))], heights, width,
                   color=color[label], label=label)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=7)
        ax.set_ylabel(f"{n} shots\naccuracy %")
        ax.set_ylim(0, 100)
    axes[0, 0].legend(fontsize=7, ncol=min(len(labels), 4), loc="upper right")
    fig.suptitle(f"{split} / {model}: accuracy per {key} and gold label (mean over seeds; dashed: chance)")
    return save(fig, out, f"{slug(split)}-{slug(key)}-{slug(model)}")


KIND_STYLE = {  # how the interval plot draws an option, by what the verdict says of it
    "best": ("#1a1a1a", "the best"), "highest": ("#1a1a1a", "highest estimate"),
    "equivalent": ("#2a7d4f", "shown equivalent"), "open": ("#c77700", "not shown different (open)"),
    "worse": ("#8c8c8c", "shown worse"), "not judged": ("#4a6fa5", "not judged"),
}
FEW_SEEDS = 10  # per-seed points are drawn up to this many seeds: beyond, the mean and interval say it


def interval_plot(rows: list, metric: str, floor: float | None, margin: float | None, level: float, out: Path,
                  name: str) -> str | None:
    """The comparison a family's verdict rests on (rows: report.answer.Plotted, highest estimate first). Left: each
    option's value per seed, its mean and own 95% interval, the majority-class floor. Right (when the verdict judged
    anything): each option's difference to the best with the simultaneous interval, 0 and the ±margin band."""
    if not rows:
        return None
    k, unit = (100.0, " %") if metric in PERCENT else (1.0, "")
    mname = METRIC_NAMES[metric]
    judged = any(r.vs_best is not None and r.kind not in ("best", "highest") for r in rows)
    fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(7.6 if judged else 4.8, 0.28 * len(rows) + 1.3),
                             sharey=True, squeeze=False, gridspec_kw={"width_ratios": [1, 1.3]} if judged else None)
    ys = list(range(len(rows)))[::-1]  # the highest estimate on top
    left = axes[0, 0]
    for y, r in zip(ys, rows):
        color = KIND_STYLE[r.kind][0]
        if r.own is not None and finite(r.own.value):
            if finite(r.own.lo, r.own.hi):
                left.plot([k * r.own.lo, k * r.own.hi], [y, y], color=color, lw=2.5, alpha=0.45, solid_capstyle="butt")
            left.plot(k * r.own.value, y, "|", color=color, ms=11, mew=2)
        if len(r.seeds) <= FEW_SEEDS:
            jitter = [0.0] if len(r.seeds) == 1 else [0.3 * (i / (len(r.seeds) - 1) - 0.5) for i in range(len(r.seeds))]
            left.scatter([k * s for s in r.seeds], [y + j for j in jitter], s=14, facecolors="none",
                         edgecolors=color, linewidths=0.9, zorder=3)
    if floor is not None:
        left.axvline(k * floor, color="grey", ls="--", lw=1)
    left.set_yticks(ys, [r.name for r in rows])
    left.set_ylim(-0.6, len(rows) - 0.4)
    left.set_xlabel(f"{mname}{unit}")
    left.set_title("each seed ○, mean |, 95% interval", fontsize=8)
    if judged:
        right = axes[0, 1]
        if margin is not None:
            right.axvspan(-k * margin, k * margin, color=KIND_STYLE["equivalent"][0], alpha=0.12, lw=0)
        right.axvline(0, color="black", lw=0.8)
        for y, r in zip(ys, rows):
            if r.vs_best is None:
                continue
            color = KIND_STYLE[r.kind][0]
            value, lo, hi = (k * x for x in r.vs_best)
            if r.kind in ("best", "highest"):
                right.plot(0, y, "D", color=color, ms=5, zorder=3)
                continue
            right.plot([lo, hi], [y, y], color=color, lw=2.5, solid_capstyle="butt")
            right.plot(value, y, "o", color=color, ms=4, zorder=3)
        right.set_xlabel(f"{mname}{unit} − the best's")
        right.set_title(f"difference to the best, simultaneous {100 * level:.1f}%", fontsize=8)
    kinds = list(dict.fromkeys(r.kind for r in rows))
    handles = [plt.Line2D([], [], color=KIND_STYLE[c][0], lw=2.5, label=KIND_STYLE[c][1]) for c in kinds]
    if floor is not None:
        handles.append(plt.Line2D([], [], color="grey", ls="--", lw=1, label="majority class (floor)"))
    if judged and margin is not None:
        handles.append(plt.Rectangle((0, 0), 1, 1, color=KIND_STYLE["equivalent"][0], alpha=0.12, lw=0,
                                     label=f"±{k * margin:g}{unit}: equivalence margin"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return save(fig, out, name)


def spread(ys: list[float], gap: float) -> list[float]:
    """Positions for labels at heights `ys` (display units), each at least `gap` from the others, moved as little as
    the order allows (a forward pass pushes them apart, then the set is recentred on the points)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = -math.inf
    for i in order:
        placed[i] = last = max(ys[i], last + gap)
    shift = sum(placed[i] - ys[i] for i in order) / max(len(ys), 1)
    return [p - shift for p in placed]

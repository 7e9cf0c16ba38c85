"""Looks that spend α by a stated plan, and what more seeds could still settle (docs/statistics.md, "Looks" and
"Futility").

**The plan** (`Plan`): a grid whose spec lists N seeds can be looked at with 4, 5, …, N seeds per option (nothing is
claimed before 4: fewtune.stats.compare.MIN_SEEDS). The looks are fixed by the seed counts, not by when someone
runs `fewtune report`: a look at n seeds always reads each option's first n runs in the spec's seed order, so
reading the database again adds no chance to be wrong. The family-wise α is spent over the looks by the
Lan–DeMets O'Brien–Fleming-type function α(t) = 2 − 2Φ(z_{1−α/2}/√t) at the information fraction t = n/N; the look at
n seeds gets α(n/N) − α(previous look), so the last look gets what the earlier ones did not use and the looks add
up to α exactly. Each look is tested at its own share (a union bound over the looks: valid whatever their
correlation, so the error over all looks is ≤ α; simulated in benchmarks/claims.py). For N = 4: one look, 5 %; N = 6: 1.64,
1.54, 1.82 % at 4, 5, 6 seeds; N = 8: 0.56, 0.76, 1.05, 1.25, 1.39 % at 4 … 8.

**The claims over looks** (`sequential`): a claim made at any look stands ("shown worse at 4 seeds"); the
intervals shown are the last look's.

**Futility** (`chances`): for every open comparison (an option neither shown worse than the best nor within the
margin of it), the chance that the last look within reach would settle it if the difference measured now were
the truth and the variances stayed as measured: the seed part of its variance shrinks as 1/n (projected from the
pooled residual variance, which 2-3 seeds estimate far better than an option's own), the evaluation part stays.
fewtune.grid.decide stops giving seeds to a comparison below FUTILITY = 20 %, and stops the grid when no open
comparison can reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as _scipy_stats

from . import compare
from .compare import ALPHA, MIN_SEEDS, OptionRuns, Verdict

FUTILITY = 0.2     # an open comparison below this chance of being settled within reach gets no more seeds
MAX_SEEDS = 50     # what-it-would-take searches stop here


@dataclass(frozen=True)
class Plan:
    """How α is spent over the looks of a grid with `seeds` seeds per option (see the module docstring)."""
    seeds: int
    alpha: float = ALPHA

    @property
    def looks(self) -> tuple[int, ...]:
        return tuple(range(MIN_SEEDS, self.seeds + 1))

    def spent(self, n: int) -> float:
        """α spent by the look at n seeds and every look before it."""
        if n < MIN_SEEDS:
            return 0.0
        if n >= self.seeds:
            return self.alpha
        z = _scipy_stats.norm.ppf(1 - self.alpha / 2)
        return float(2 - 2 * _scipy_stats.norm.cdf(z / math.sqrt(n / self.seeds)))

    def share(self, n: int) -> float:
        """The α of the look at n seeds."""
        if n not in self.looks:
            return 0.0
        return self.spent(n) - (self.spent(n - 1) if n - 1 >= MIN_SEEDS else 0.0)

    def describe(self) -> str:
        if not self.looks:
            return f"{self.seeds} seed(s): no look (nothing is claimed before {MIN_SEEDS} seeds)"
        if len(self.looks) == 1:
            return f"one look, at {self.seeds} seeds, with the family-wise {100 * self.alpha:g}%"
        shares = ", ".join(f"{100 * self.share(n):.2f}% at {n}" for n in self.looks)
        return f"family-wise {100 * self.alpha:g}% spent over looks at {MIN_SEEDS}–{self.seeds} seeds ({shares})"


def most_seeds(options: list[OptionRuns]) -> int:
    """The most runs any trained option has (a constant's one run stands for every seed)."""
    return max((len(np.atleast_2d(o.pred)) for o in options if not o.constant), default=0)


def plan_for(plan: Plan | None, most: int) -> Plan:
    """The plan of data whose trained options have at most `most` seeds: the grid's (its spec's seeds), else, for
    runs recorded without one, `most`; never fewer seeds than the data hold (the looks must reach them)."""
    if plan is None:
        return Plan(max(most, MIN_SEEDS))
    return plan if plan.seeds >= most else replace(plan, seeds=most)


def first(options: list[OptionRuns], n: int) -> list[OptionRuns]:
    """Each option's first n runs (its order is the spec's seed order: fewtune.stats.claims sorts it)."""
    return [o if o.constant else OptionRuns(o.name, tuple(o.seeds[:n]), np.atleast_2d(o.pred)[:n], False)
            for o in options]


def sequential(gold, options: list[OptionRuns], n_classes: int, metric: str, margin: float | None = None,
               plan: Plan | None = None) -> Verdict:
    """The family's verdict over every look its data can have had (see the module docstring)."""
    most = most_seeds(options)
    plan = plan_for(plan, most)
    done = [n for n in plan.looks if n <= most]
    if not done:
        v = compare.family(gold, options, n_classes, metric, margin, plan.share(MIN_SEEDS) or plan.alpha,
                           looks=len(plan.looks))
        v.plan, v.alpha_spent = plan, 0.0
        return v
    worse: dict[str, str] = {}
    within: set[str] = set()
    at: dict[str, int] = {}
    v = None
    for n in done:
        v = compare.family(gold, first(options, n), n_classes, metric, margin, plan.share(n), looks=len(plan.looks))
        if v.reason:
            continue
        for i, j in v.worse.items():
            if i not in worse:
                worse[i], at[i] = j, n
        for i in v.equivalent_to_best:
            if i not in within and i not in worse:
                within.add(i)
                at.setdefault(i, n)
    last = v  # the look at `most` seeds: all the data
    if last.reason:
        last.plan, last.alpha_spent = plan, plan.spent(most)
        return last
    candidates = [n for n in last.options if n not in worse]
    best = max(candidates, key=lambda n: last.effects[n])
    if best != last.best:  # an earlier look's claim stands: the highest estimate among the rest is read as best
        vs_best = {}
        for n in last.options:
            if n == best:
                continue
            d = last.fit.pair(best, n)
            if d is not None:
                vs_best[n] = compare.Comparison(best, n, d, shown=n in worse, equivalent=n in within)
    else:
        vs_best = {n: replace(c, shown=n in worse, equivalent=n in within) for n, c in last.vs_best.items()}
    return replace(last, best=best, worse=worse, candidates=candidates,
                   equivalent_to_best=[n for n in candidates if n in within and n != best], vs_best=vs_best,
                   claimed_at={n: at[n] for n in last.options if n in at}, plan=plan, alpha_spent=plan.spent(most))


# ----------------------------------------------------------------------------- what more seeds could do
def _projected(fit: compare.Fit, best: str, other: str, n_now: float, n_then: float):
    """(value, seed variance, example variance, df) of best − other projected to n_then seeds per option: the
    seed part from the pooled residual variance (or the level variance against a constant), scaled by n_now/n_then;
    None when they cannot be compared."""
    d = fit.pair(best, other)
    if d is None:
        return None
    ks = [fit.names.index(best), fit.names.index(other)]
    trained = [k for k in ks if not fit.constant[k]]
    if not trained:
        return d.value, 0.0, d.example_var, math.inf
    if len(trained) == 2:
        var, df = fit.sigma2, fit.df
        per = sum(1 / fit.n[k] for k in trained)
    else:
        var, df = fit.within2, fit.df_within
        per = 1 / fit.n[trained[0]]
    if not (df > 0) or math.isnan(var):
        return None
    scale = n_now / max(n_then, 1)
    return d.value, var * per * scale, d.example_var, df * (n_then - 1) / max(n_now - 1, 1)


def settle_chance(fit: compare.Fit, best: str, other: str, n_then: int, margin: float | None, k: int,
                  m: int | None = None, alpha_last: float = ALPHA) -> float:
    """The chance that best − other would be settled (shown worse, or within the margin) at a look with n_then seeds
    per option at level alpha_last, if the difference measured now were the truth (see the module docstring)."""
    n_now = min(fit.n[fit.names.index(x)] for x in (best, other) if not fit.constant[fit.names.index(x)]) \
        if any(not fit.constant[fit.names.index(x)] for x in (best, other)) else n_then
    p = _projected(fit, best, other, n_now, n_then)
    if p is None:
        return math.nan
    value, sv, ev, df = p
    se = math.sqrt(sv + ev)
    if se == 0:
        return 1.0
    m = k if m is None else m
    half = math.sqrt(compare.critical(k, m, df, alpha_last) ** 2 * sv
                     + compare.critical(k, m, math.inf, alpha_last) ** 2 * ev)
    chance = float(_scipy_stats.norm.cdf((abs(value) - half) / se))
    if margin is not None:
        chance = max(chance, float(_scipy_stats.norm.cdf((margin - abs(value) - half) / se)))
    return chance


def chances(v: Verdict, reach: dict[str, int], margin: float | None = None) -> dict[str, float]:
    """Every open comparison (option -> the chance it is settled at the last look within reach: `reach` gives the
    seeds per option reachable by the spec and the time left; the plan's α at that look)."""
    fit = v.fit
    if fit is None or v.best is None:
        return {}
    k = len(v.options)
    plan = v.plan or Plan(max(reach.values(), default=MIN_SEEDS))
    out = {}
    for n in v.options:
        if n == v.best or n in v.worse or n in v.equivalent_to_best:
            continue
        # a seed-free option needs no seeds: the comparison reaches as far as its trained side does
        sides = [reach.get(x, MIN_SEEDS) for x in (n, v.best) if x not in v.constants]
        then = min(sides) if sides else MIN_SEEDS
        if then < MIN_SEEDS:  # the seeds (or the time) left cannot bring it to a look: it cannot be settled
            out[n] = 0.0
            continue
        a = plan.share(then) if then <= plan.seeds else Plan(then, plan.alpha).share(then)
        out[n] = settle_chance(fit, v.best, n, then, margin, k, v.m_star or None, a)
    return out


def seeds_to_settle(v: Verdict, other: str, margin: float | None = None, chance: float = 0.5,
                    max_seeds: int = MAX_SEEDS) -> int | None:
    """The fewest seeds per option at which best − other would be settled with `chance` (0.5: the measured
    difference just clears the interval) under a plan of that many seeds; None beyond max_seeds."""
    fit = v.fit
    if fit is None or v.best is None:
        return None
    k = len(v.options)
    start = max(MIN_SEEDS, min(fit.n[fit.names.index(x)] for x in (v.best, other)))
    for n in range(start, max_seeds + 1):
        c = settle_chance(fit, v.best, other, n, margin, k, v.m_star or None, Plan(n).share(n))
        if c >= chance:
            return n
    return None

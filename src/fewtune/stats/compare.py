"""Claims that survive selection: which options are worse than the best, which are within the margin of it, for
one family at one look. docs/statistics.md gives the algebra; fewtune.stats.sequential spends α over the looks.

A *family* is every option of one (model, task) scored on one evaluation split (in-domain or out-of-domain) by the
task's primary metric. The report, `--until-resolved` and the findings all ask this module (through
fewtune.stats.claims) what may be claimed. In short:

1. **The fit** (`Fit`): the per-seed metric M[k, s] of option k under data seed s follows
   M[k, s] = θ_k + β_s + e[k, s]: β_s is what seed s's sample does to every method alike (pairing removes it), e
   the option × seed residual (training instability and per-seed evaluation noise). θ and β are fitted by least
   squares over every run, so options with different numbers of seeds (after `--until-resolved`) are compared on
   all they have. **Each option has its own residual variance** σ²_k (`Fit.variances`): the unbiased
   solution of E[SS_k] = Σ_j B_kj σ²_j (each option's residual sum of squares also holds a share of the others'
   variances through the fitted seed effects), floored at the pooled residual variance of the family. A contrast's seed variance is Σ_c w_c² σ²_{k(c)}
   over the runs c it weighs, with Welch–Satterthwaite degrees of freedom: an unstable option widens only the
   contrasts it is in, so it cannot make stable options look different from it. No trained option's variance is
   below the pooled residual variance of the family: three runs that agree (collapsed to one class, or happened to
   miss the collapses other runs show) say little about how unstable a method is, and never give a variance of 0.
2. **Seed-free constants** (`OptionRuns.constant`): an option whose method and options never read the data seed
   (zero-shot; fewtune.methods' `seed_free`) is a known constant under every seed, decided by what it *is*, never
   because its runs happened to agree. It is kept out of the fit and enters contrasts as a constant; a contrast of a
   constant with a trained option uses the trained option's own between-seed variance (which includes β).
3. **Evaluation sampling**, which more seeds never shrink, is added per contrast: the variance over the N examples
   of the contrast's per-example values (jackknife pseudo-values of the metric, exact for accuracy), less the
   per-seed noise the seed part already holds, over N.
4. **Claims about the best, by closed testing** (`family`): the elementary hypotheses are H_i "option i is a best"
   (θ_i ≥ θ_j for every j; ties included, so "worse" is a strict claim). The intersection H_S, "every option in S
   is a best", is rejected when some i in S lies below some other option by more than c_{|S|} standard errors, where
   c_m = `critical(K, m, df, α)` is the exact critical value under the least favourable configuration (all K
   equal): at m = K the studentized range (Tukey), at m = 1 the one-sided Dunnett value of Hsu's MCB. Closing the
   family gives a shortcut: with N(m) the options not beaten at c_m, m* = the largest m with |N(m)| ≥ m, and option
   i is *worse than the best* exactly when it is beaten at c_{m*}. The family-wise error over these strict claims is
   ≤ α whatever the truth. *Within the margin of the best* (max_{j≠i} θ_j − θ_i < margin, a margin fixed before the
   run) is claimed from the MCB upper bound max_j (X_j − X_i + c·se_ji) at the same c_{m*} ≥ c_1 (Hsu's constrained
   intervals use c_1; a larger value only widens them).
5. **All pairs** (Tukey–Kramer, `Verdict.pairs`) are kept only for reading pairs below the best (budgets, the
   report's subsets), and are said to be that.
6. **The floor**: each option against the majority-class baseline, paired by example, Bonferroni over the options.

Nothing is claimed before every trained option has MIN_SEEDS = 4 seeds: an option's own variance from 3 runs has
under 2 degrees of freedom, and an unstable method whose first 3 runs happened to agree was then read as stable
often enough to push the false-claim rate past 5 % (6.4 % of 1,000 simulated grids with one option 4x more
unstable when claims started at 3 seeds; 4.3-4.8 % from 4: docs/statistics.md). Checked by simulation (tests/test_compare.py, and at 1,000 runs
a scenario in benchmarks/claims.py): equal options, one option up to 10x more unstable, up to half of the trained
runs collapsed, accuracy and MCC, with the allocator as it runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize as _optimize
from scipy import special as _special
from scipy import stats as _scipy_stats

from . import stats

ALPHA = 0.05
MIN_SEEDS = 4      # nothing is claimed before every trained option has 4 seeds (see the module docstring)
ASSESS_SEEDS = 2   # the allocator may project what more seeds would do from 2 (it claims nothing from them)


@dataclass(frozen=True)
class OptionRuns:
    """One option's stored predictions on a family's evaluation examples: row r under data seed `seeds[r]`.
    `constant`: the option is seed-free by what it is (its method never reads the data seed): one run stands for
    every seed."""
    name: str
    seeds: tuple
    pred: np.ndarray  # [n_seeds, N] predicted class ids
    constant: bool = False


@dataclass(frozen=True)
class Contrast:
    """Σ_k c_k θ_k for option weights c, from the fit; lo/hi are filled by the procedure that uses it."""
    value: float
    seed_var: float      # the options' own residual variances' share of Var(value)
    example_var: float   # evaluation sampling's share
    df: float            # of the seed part (Welch–Satterthwaite)
    lo: float = math.nan
    hi: float = math.nan

    @property
    def se(self) -> float:
        return math.sqrt(self.seed_var + self.example_var)

    def half(self, crit_seed: float, crit_examples: float) -> float:
        """sqrt(crit_seed² · seed_var + crit_examples² · example_var): each part widened by the quantile of its own
        degrees of freedom (one pooled Satterthwaite quantile under-covers at few seeds: stats.py)."""
        return math.sqrt(crit_seed ** 2 * self.seed_var + crit_examples ** 2 * self.example_var)

    def with_interval(self, crit_seed: float, crit_examples: float) -> "Contrast":
        h = self.half(crit_seed, crit_examples)
        return Contrast(self.value, self.seed_var, self.example_var, self.df, self.value - h, self.value + h)


class Fit:
    """The model of a family's per-seed metric (the module docstring, item 1; docs/statistics.md, "The fit")."""

    def __init__(self, gold, options: list[OptionRuns], n_classes: int, metric: str):
        self.gold = np.asarray(gold, dtype=np.int64)
        self.options = list(options)
        self.metric, self.n_classes = metric, n_classes
        self.names = [o.name for o in self.options]
        seeds = sorted({s for o in self.options if not o.constant for s in o.seeds}, key=lambda s: (str(type(s)), s))
        seed_ids = {s: j for j, s in enumerate(seeds)}
        self.per_seed, self.pv, self.eps, self.n = [], [], [], []
        self.constant, self.collapsed, self.agree = [], [], []
        for o in self.options:
            pred = np.atleast_2d(np.asarray(o.pred, dtype=np.int64))
            if o.constant:
                pred = pred[:1]  # seed-free: one run stands for every seed
            self.per_seed.append(np.array([stats.metric_value(self.gold, p, n_classes, metric) for p in pred]))
            pv = stats.pseudo_values(self.gold, pred, n_classes, metric)  # [n_k, N]
            self.pv.append(pv)
            self.eps.append(_cell_noise(pv))
            self.n.append(len(pred))
            self.constant.append(bool(o.constant))
            # a trained option's runs that all predict one class: a warning, never a reason to call it constant
            self.collapsed.append(not o.constant and len(pred) >= 2
                                  and all(len(np.unique(p)) == 1 for p in pred))
            self.agree.append(not o.constant and len(pred) >= 2 and float(np.ptp(self.per_seed[-1])) == 0.0)
        self.stochastic = [k for k in range(len(self.options)) if not self.constant[k]]
        cells = [(k, seed_ids[s], r) for k in self.stochastic for r, s in enumerate(self.options[k].seeds[:self.n[k]])]
        self.cells = cells
        self.cell_opt = np.asarray([k for k, _, _ in cells], dtype=np.int64)
        self.m = np.asarray([self.per_seed[k][r] for k, _, r in cells], dtype=np.float64)
        self.cell_pv = (np.asarray([self.pv[k][r] for k, _, r in cells], dtype=np.float64).reshape(len(cells), -1)
                        if cells else np.zeros((0, len(self.gold))))
        self.cell_eps = np.asarray([self.eps[k] for k, _, _ in cells], dtype=np.float64)
        self.col = {k: i for i, k in enumerate(self.stochastic)}
        n_opt, n_s = len(self.stochastic), len(seeds)
        x = np.zeros((len(cells), n_opt + max(n_s - 1, 0)))
        for c, (k, j, _) in enumerate(cells):
            x[c, self.col[k]] = 1.0
            if j > 0:
                x[c, n_opt + j - 1] = 1.0
        self.x = x
        self.xtx_pinv = np.linalg.pinv(x.T @ x) if len(cells) else np.zeros((0, 0))
        self.coef = self.xtx_pinv @ x.T @ self.m if len(cells) else np.zeros(0)
        rank = int(np.linalg.matrix_rank(x)) if len(cells) else 0
        self.df = float(len(cells) - rank)
        resid = self.m - x @ self.coef if len(cells) else np.zeros(0)
        self.resid = resid
        self.sigma2 = float(resid @ resid / self.df) if self.df > 0 else math.nan  # pooled: the floor
        leverage = np.einsum("ij,jk,ik->i", x, self.xtx_pinv, x) if len(cells) else np.zeros(0)
        self.cell_df = np.clip(1.0 - leverage, 0.0, None)  # each run's share of the residual degrees of freedom
        # within-option variance of per-seed values (includes β): for contrasts with a constant
        ss = sum(float(((self.per_seed[k] - self.per_seed[k].mean()) ** 2).sum()) for k in self.stochastic)
        self.df_within = float(sum(self.n[k] - 1 for k in self.stochastic))
        self.within2 = ss / self.df_within if self.df_within > 0 else math.nan
        self._own, self._own_df, self._lvl, self._lvl_df = self._option_variances()
        seed_mean = np.zeros(x.shape[1])
        if n_s > 1:
            seed_mean[n_opt:] = 1.0 / n_s
        self.level_rows = {}
        for k in self.stochastic:
            c = seed_mean.copy()
            c[self.col[k]] = 1.0
            self.level_rows[k] = c

    def _option_variances(self):
        """Each trained option's own residual variance and its degrees of freedom (docs/statistics.md, "Own
        variances"): the unbiased solution of E[SS_k] = Σ_j B_kj σ²_j, B_kj = Σ_{c∈k, c'∈j} (I − H)²_cc' (each
        option's residual sum of squares holds a share of every other option's variance through the fitted seed
        effects; for the balanced design this is Shukla's stability variance), floored at the family's pooled residual
        variance (with its degrees of freedom): an option above it keeps its own, one below it (its few runs agree,
        or happened to miss the collapses the other options show) gets the pooled one, never less, never 0. Also its own between-seed variance (with β), for contrasts
        with a constant."""
        own, own_df, lvl, lvl_df = {}, {}, {}, {}
        ks = self.stochastic
        ss = np.array([float((self.resid[self.cell_opt == k] ** 2).sum()) for k in ks])
        h = np.array([float(self.cell_df[self.cell_opt == k].sum()) for k in ks])
        est = None
        if len(ks) >= 3 and self.df > 0:
            resid_maker = np.eye(len(self.cells)) - self.x @ self.xtx_pinv @ self.x.T
            sq = resid_maker ** 2
            member = np.stack([(self.cell_opt == k).astype(float) for k in ks])  # [options, cells]
            b = member @ sq @ member.T
            if np.linalg.matrix_rank(b) == len(ks):
                est = np.linalg.solve(b, ss)
        for i, k in enumerate(ks):
            value = (est[i] if est is not None else ss[i] / h[i]) if h[i] > 1e-9 else math.nan
            if self.agree[k] or not value > self.sigma2:
                # the pooled variance is the floor: a trained option whose few runs agree, or happened to miss
                # its collapses, is never more certain than the family's options are on average
                own[k], own_df[k] = self.sigma2, self.df
            else:
                own[k], own_df[k] = value, h[i]
            spread = float(np.var(self.per_seed[k], ddof=1)) if self.n[k] >= 2 else math.nan
            if self.agree[k] or not spread > self.within2:  # the same floor for the level (with β)
                lvl[k], lvl_df[k] = self.within2, self.df_within
            else:
                lvl[k], lvl_df[k] = spread, float(self.n[k] - 1)
        return own, own_df, lvl, lvl_df

    @property
    def n_examples(self) -> int:
        return len(self.gold)

    def variances(self) -> dict[str, tuple[float, float]]:
        """option -> (its residual variance, its degrees of freedom); constants: (0, inf)."""
        return {self.names[k]: ((self._own[k], self._own_df[k]) if k in self._own else (0.0, math.inf))
                for k in range(len(self.options))}

    def effects(self) -> dict[str, float]:
        """Each option's level: its mean under an average seed (seed effects adjusted; with every option on the
        same seeds, exactly its mean over seeds); a constant's value."""
        out = {}
        for k, n in enumerate(self.names):
            if self.constant[k]:
                out[n] = float(self.per_seed[k][0])
            else:
                row = self.level_rows[k]
                out[n] = float(self._run_weights(row) @ self.m) if self._estimable(row) \
                    else float(self.per_seed[k].mean())
        return out

    def _estimable(self, c: np.ndarray) -> bool:
        return bool(np.allclose(self.x.T @ self.x @ self.xtx_pinv @ c, c, atol=1e-8))

    def _run_weights(self, c: np.ndarray) -> np.ndarray:
        return self.x @ self.xtx_pinv @ c  # value = w · M: the weight of every trained run in the estimate

    def contrast(self, weights: dict[str, float]) -> Contrast | None:
        """The contrast Σ c_k θ_k (weights summing to 0) with its two variance parts; None when the runs do not
        connect the options it names (no seed in common, directly or through other options)."""
        if abs(sum(weights.values())) > 1e-9:
            raise ValueError("a contrast's weights must sum to 0")
        c = np.zeros(self.x.shape[1])
        const, z_const = 0.0, np.zeros(self.n_examples)
        stoch_sum = 0.0
        for name, wt in weights.items():
            k = self.names.index(name)
            if self.constant[k]:
                const += wt * float(self.per_seed[k][0])
                z_const += wt * self.pv[k][0]
            else:
                c += wt * self.level_rows[k]
                stoch_sum += wt
        paired = abs(stoch_sum) < 1e-9  # a difference of trained options: the seed effects cancel
        if c.any() and not self._estimable(c):
            return None
        w = self._run_weights(c) if c.any() else np.zeros(len(self.cells))
        value = float(w @ self.m) + const
        seed_var, df = 0.0, math.inf
        if w.any():
            var, dfs = (self._own, self._own_df) if paired else (self._lvl, self._lvl_df)
            parts = [(float((w[self.cell_opt == k] ** 2).sum()) * var[k], dfs[k]) for k in self.stochastic]
            parts = [(p, d) for p, d in parts if p > 0]
            seed_var = sum(p for p, _ in parts)
            if any(not d > 0 or math.isnan(p) for p, d in parts):
                seed_var, df = math.nan, 0.0
            else:
                denom = sum(p * p / d for p, d in parts)
                df = seed_var ** 2 / denom if denom > 0 else math.inf  # Welch–Satterthwaite
        z = w @ self.cell_pv + z_const  # per example: the contrast's example values
        example_var = 0.0
        if self.n_examples > 1:
            # Var_i(z) holds each run's own per-seed example noise once more: the seed part already counts it
            example_var = max(0.0, float(z.var(ddof=1)) - float((w ** 2 * self.cell_eps).sum())) / self.n_examples
        return Contrast(value, seed_var, example_var, float(df))

    def pair(self, a: str, b: str) -> Contrast | None:
        return self.contrast({a: 1.0, b: -1.0})


def _cell_noise(pv: np.ndarray) -> float:
    """An option's per-seed example noise: the residual mean square of its seeds × examples table of pseudo-values
    (what varies between its seeds example by example); 0 with one seed (cannot be told: nothing is subtracted,
    which errs wide)."""
    n, big_n = pv.shape
    if n < 2 or big_n < 2:
        return 0.0
    resid = pv - pv.mean(1, keepdims=True) - pv.mean(0, keepdims=True) + pv.mean()
    return float((resid ** 2).sum() / ((n - 1) * (big_n - 1)))


# ----------------------------------------------------------------------------- critical values of the closure
def critical(k: int, m: int, df: float, alpha: float = ALPHA) -> float:
    """c_m: P(H_S is rejected) = α for |S| = m of k options, all k equal (the least favourable configuration), the
    pairwise statistic (X_j − X_i)/(se·√2 · W) with W = χ_df/√df:

        P(no i in S is beaten by c) = E_W[ m ∫ φ(z) (Φ(z + c√2·W) − Φ(z))^(m−1) Φ(z + c√2·W)^(k−m) dz ].

    At m = k this is the studentized range (Tukey: scipy.stats.studentized_range), at m = 1 the one-sided Dunnett
    value for k − 1 comparisons with correlation ½ (Hsu's MCB: scipy.stats.multivariate_t); scipy has no function
    for the levels between, so the integral is taken with Gauss–Legendre nodes over z and over the quantiles of W
    (tests/test_compare.py checks both ends against scipy to 1e-3). df is rounded down to a grid (wider, never
    narrower; the value is cached)."""
    if k < 2:
        return float(_scipy_stats.norm.ppf(1 - alpha))
    m = max(1, min(int(m), int(k)))
    return _critical(int(k), m, _df_grid(df), float(alpha))


def _df_grid(df: float) -> float:
    if df is None or math.isnan(df) or df <= 0:
        return 0.25
    if math.isinf(df) or df > 1000:
        return math.inf
    if df < 10:
        return max(math.floor(df * 4) / 4, 0.25)
    if df < 30:
        return float(math.floor(df))
    return float(math.floor(df / 5) * 5) if df < 200 else 200.0


_Z, _ZW = np.polynomial.legendre.leggauss(240)
_Z, _ZW = 9.0 * _Z, 9.0 * _ZW
_PHI_Z, _CDF_Z = _scipy_stats.norm.pdf(_Z), _special.ndtr(_Z)


def _u_nodes():
    edges = [0.0, 1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999, 0.9999, 1 - 1e-6, 1.0]
    x, w = np.polynomial.legendre.leggauss(16)
    us, ws = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        us.append(a + (b - a) * (x + 1) / 2)
        ws.append(w * (b - a) / 2)
    return np.concatenate(us), np.concatenate(ws)


_U, _UW = _u_nodes()


def _p_none_beaten(k: int, m: int, a: np.ndarray) -> np.ndarray:
    """df = ∞ probability for each shift a = c√2·W (vectorised over a)."""
    upper = _special.ndtr(_Z[None, :] + a[:, None])
    inner = np.clip(upper - _CDF_Z[None, :], 0.0, 1.0)
    f = m * _PHI_Z[None, :] * inner ** (m - 1) * upper ** (k - m)
    return f @ _ZW


@functools.lru_cache(maxsize=8192)
def _critical(k: int, m: int, df: float, alpha: float) -> float:
    if math.isinf(df):
        w, ww = np.ones(1), np.ones(1)
    else:
        w, ww = _scipy_stats.chi.ppf(_U, df) / math.sqrt(df), _UW

    def excess(c: float) -> float:
        return float(_p_none_beaten(k, m, c * math.sqrt(2) * w) @ ww) - (1 - alpha)

    hi = 4.0
    while excess(hi) < 0 and hi < 1e4:
        hi *= 2
    return float(_optimize.brentq(excess, 0.0, hi, xtol=1e-6))


def tukey_critical(k: int, df: float, alpha: float = ALPHA) -> float:
    """q(1 − α; k, df)/√2, the all-pairs (Tukey–Kramer) value: the closure's value at m = k, which is the
    studentized range (equal to scipy.stats.studentized_range to 1e-6, tests/test_compare.py; scipy's own quantile
    takes ~80 ms a call, this shares the closure's cache)."""
    if k < 2:
        return float(_scipy_stats.norm.ppf(1 - alpha / 2))
    return critical(k, k, df, alpha)


# ----------------------------------------------------------------------------- the claims of one look
@dataclass(frozen=True)
class Comparison:
    """`better` − `worse`. In Verdict.vs_best: the best against an option, its diff the value best − option with the
    MCB-type interval of max_{j≠option} θ_j − θ_option from the closed procedure (lo > 0: shown worse than the
    best; hi < margin: within the margin of the best). In Verdict.pairs: a Tukey–Kramer interval."""
    better: str
    worse: str
    diff: Contrast
    shown: bool                # `worse` is shown worse
    equivalent: bool           # within the margin


@dataclass
class Verdict:
    """What may be said about one family. `best` is the option with the highest fitted effect among those not
    shown worse; it is the best (a claim) only when every other option is shown worse or within the margin."""
    metric: str
    options: list[str]
    effects: dict[str, float]
    best: str | None
    worse: dict[str, str]                 # option -> the option it is shown worse than (strict: ties included)
    candidates: list[str]                 # options not shown worse: each may be the best
    equivalent_to_best: list[str]         # candidates within `margin` of the best (max_j θ_j − θ_i < margin)
    vs_best: dict[str, Comparison]        # every other option against the best (closed-procedure bounds)
    margin: float | None
    level: float                          # 1 − the α of the look this verdict's intervals come from
    looks: int                            # the looks of the plan (fewtune.stats.sequential.Plan)
    min_seeds: int                        # the fewest seeds of a trained option
    n_examples: int
    df: float                             # the pooled residual degrees of freedom
    reason: str = ""                      # why nothing is claimed ("fewer than 4 seeds", "one option")
    pairs: dict = field(default_factory=dict)  # (a, b) -> Tukey–Kramer Comparison: pairs below the best only
    m_star: int = 0                       # the closure's level: c_{m*} made the claims
    critical: float = math.nan            # c_{m*} at df = ∞ (the seed part uses each contrast's own df)
    constants: list[str] = field(default_factory=list)   # seed-free options (one run stands for every seed)
    collapsed: list[str] = field(default_factory=list)   # trained options whose every run predicted one class
    claimed_at: dict[str, int] = field(default_factory=dict)  # option -> seeds at the look that made its claim
    alpha_spent: float = math.nan         # of the family-wise α, by the looks done so far
    plan: object = None                   # the sequential.Plan the looks follow
    procedure: str = ("closed test of 'these options are all bests' (critical values from Tukey's at all-equal "
                      "to Hsu's MCB at one), own seed variances with Welch–Satterthwaite df")
    fit: object = field(default=None, repr=False)

    @property
    def resolved(self) -> bool:
        """The best is known: every other option is shown worse or within the margin of it."""
        return (self.best is not None and not self.reason
                and all(o in self.worse or o in self.equivalent_to_best for o in self.options if o != self.best))

    @property
    def undecided(self) -> list[str]:
        """Candidates not within the margin of the best: where more data could still change the answer (none while
        nothing is judged: `reason` says why)."""
        if self.reason:
            return []
        return [o for o in self.candidates if o != self.best and o not in self.equivalent_to_best]


def min_seeds_of(options: list[OptionRuns]) -> int:
    """The fewest seeds of a trained option (a constant stands for every seed; all constants: 0)."""
    trained = [len(np.atleast_2d(o.pred)) for o in options if not o.constant]
    return min(trained) if trained else 0


def family(gold, options: list[OptionRuns], n_classes: int, metric: str, margin: float | None = None,
           alpha: float = ALPHA, looks: int = 1) -> Verdict:
    """The claims of one look at level α (see the module docstring, item 4): fewtune.stats.sequential decides the
    α of each look and makes the union of their claims."""
    names = [o.name for o in options]
    fit = Fit(gold, options, n_classes, metric) if options else None
    effects = fit.effects() if fit else {}
    best = max(names, key=lambda n: effects[n]) if names else None
    min_seeds = min_seeds_of(options)
    base = dict(metric=metric, options=names, effects=effects, margin=margin, level=1 - alpha, looks=looks,
                min_seeds=min_seeds, n_examples=len(gold), df=fit.df if fit else 0.0, fit=fit,
                constants=[n for k, n in enumerate(names) if fit.constant[k]] if fit else [],
                collapsed=[n for k, n in enumerate(names) if fit.collapsed[k]] if fit else [])
    nothing = dict(worse={}, candidates=names, equivalent_to_best=[], vs_best={}, best=best)
    if len(options) < 2:
        return Verdict(**base, **nothing, reason="only one option: there is nothing to compare")
    if not fit.stochastic:
        return Verdict(**base, **nothing, reason="every option is seed-free: their values are known without error "
                                                 "beyond evaluation sampling, and there is no seed to add")
    if min_seeds < MIN_SEEDS:
        return Verdict(**base, **nothing,
                       reason=f"a trained option has {min_seeds} seed{'s' if min_seeds != 1 else ''}: nothing is "
                              f"judged before every one has {MIN_SEEDS} (its own seed variance needs them)")
    if not fit.df > 0:
        return Verdict(**base, **nothing, reason="no degrees of freedom left for the seed variance")
    k = len(names)
    diffs = {}  # (j, i) -> Contrast of θ_j − θ_i, both orders
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            d = fit.pair(a, b)
            if d is None or math.isnan(d.seed_var):
                continue
            diffs[(a, b)] = d
            diffs[(b, a)] = Contrast(-d.value, d.seed_var, d.example_var, d.df)

    def lower(m):  # option i -> (the most it is beaten by at c_m, by whom)
        out = {}
        c_ex = critical(k, m, math.inf, alpha)
        for (j, i), d in diffs.items():
            lo = d.value - d.half(critical(k, m, d.df, alpha), c_ex)
            if i not in out or lo > out[i][0]:
                out[i] = (lo, j)
        return out

    m_star, low = 1, None
    for m in range(k, 0, -1):  # m* = the largest m with |N(m)| ≥ m (N(m) only grows with m)
        low = lower(m)
        not_beaten = [n for n in names if not (n in low and low[n][0] > 0)]
        if len(not_beaten) >= m:
            m_star = m
            break
    worse = {i: j for i, (lo, j) in low.items() if lo > 0}
    c_ex = critical(k, m_star, math.inf, alpha)
    upper = {}
    for (j, i), d in diffs.items():
        hi = d.value + d.half(critical(k, m_star, d.df, alpha), c_ex)
        upper[i] = max(upper.get(i, -math.inf), hi)
    candidates = [n for n in names if n not in worse]
    best = max(candidates, key=lambda n: effects[n])
    equivalent = [n for n in candidates if n != best and margin is not None and upper.get(n, math.inf) < margin]
    vs_best = {}
    for n in names:
        if n == best or (best, n) not in diffs:
            continue
        d = diffs[(best, n)]
        iv = Contrast(d.value, d.seed_var, d.example_var, d.df, low[n][0] if n in low else math.nan,
                      upper.get(n, math.nan))
        vs_best[n] = Comparison(best, n, iv, shown=n in worse, equivalent=n in equivalent)
    pairs = {}
    t_ex = tukey_critical(k, math.inf, alpha)
    for (a, b), d in diffs.items():
        if effects[a] < effects[b] or (effects[a] == effects[b] and a > b):
            continue
        iv = d.with_interval(tukey_critical(k, d.df, alpha), t_ex)
        pairs[(a, b)] = Comparison(a, b, iv, shown=iv.lo > 0,
                                   equivalent=margin is not None and -margin < iv.lo and iv.hi < margin)
    return Verdict(**base, best=best, worse=worse, candidates=candidates, equivalent_to_best=equivalent,
                   vs_best=vs_best, pairs=pairs, m_star=m_star, critical=critical(k, m_star, math.inf, alpha))


def versus_floor(gold, option: OptionRuns, n_classes: int, metric: str, n_options: int,
                 alpha: float = ALPHA) -> stats.Estimate:
    """The option minus the majority-class baseline (the evaluation set's most frequent class everywhere), paired
    by example, at level 1 − α/n_options (Bonferroni over the family's options)."""
    gold = np.asarray(gold, dtype=np.int64)
    pred = np.atleast_2d(np.asarray(option.pred, dtype=np.int64))
    if option.constant:
        pred = pred[:1]
    majority = int(np.bincount(gold, minlength=n_classes).argmax())
    return stats.estimate(gold, pred, np.full_like(pred, majority), n_classes, metric,
                          confidence=1 - alpha / max(n_options, 1))

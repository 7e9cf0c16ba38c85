"""Simulated families of few-shot fine-tuning runs with a known truth: the data generator for the claim checks.

The example model is the one of tests/test_compare.py (the demo's setting): N = 200 evaluation examples with CoLA's
class balance (gold = 1 with probability PREVALENCE = 0.69); each example has an ease shared by every option
(sd SHARED) plus a part of its own per option (sd OWN), so options disagree on some examples. Under data seed j,
option k gets each example right with probability

    sigmoid(mu_k + shift_kj + shared_i + own_ki),        shift_kj ~ N(0, tau_k²)   (training instability),

and a wrong prediction is the other class. Correctness does not depend on the gold class ("symmetric"), so at a
given shift the true-positive and true-negative rates are both a(shift) = E_ease[sigmoid(mu + shift + ease)].

The two failure modes of few-shot fine-tuning are built in:
- instability: a per-option seed sd tau (one option can be far more unstable than the others);
- collapse: with probability `collapse[k]` a trained run degenerates to predicting the majority class (1, the gold
  majority at prevalence 0.69) for every example.
A seed-free option (zero-shot) has tau 0 and no collapse: one draw of its predictions, repeated for every seed.

Each option's `target` is its true expected metric: the expectation over seeds (the shift and whether the run
collapses) and over the population of examples, collapsed runs included. mu is solved (brentq) so that

    accuracy:  E = p·PREVALENCE + (1 − p)·E_shift[a(shift)]             (a collapsed run scores the prevalence)
    MCC:       E = (1 − p)·E_shift[MCC(a(shift))]                       (a collapsed run scores 0, by convention)

where MCC(a) is the MCC of the population confusion matrix at rate a (TP = prev·a, FN = prev·(1 − a),
TN = (1 − prev)·a, FP = (1 − prev)·(1 − a)):

    MCC(a) = (2a − 1)·sqrt(prev·(1 − prev)) / sqrt(q·(1 − q)),   q = prev·a + (1 − prev)·(1 − a)  (share predicted 1).

MCC is nonlinear in a, so its expectation over seeds integrates over the shift: nested Gauss–Hermite quadrature,
NODES_SHIFT nodes for the shift and NODES_EASE for the example ease (sd hypot(SHARED, OWN)).

Approximation (finite N). The targets are population values. A sample of N = 200 examples is what the claims see:
its accuracy is an unbiased estimate of the population accuracy (a mean of 0/1), but the sample MCC is a ratio and
is slightly biased, by an amount that depends on the option's rate a and so on its tau and collapse share.
Measured by Monte Carlo (`python tests/claims_sim.py 40000`: 40,000 families of 8 seeds per scenario, common random
numbers): mean sample metric − target per option is within ±0.0003 for accuracy (no bias beyond the Monte Carlo
error) and between −0.0008 and +0.0005 for MCC; the spread between equal-target options is at most 0.0002
(accuracy) and 0.0011 (MCC, collapse 50 %), far inside the 0.005 that tests/test_claims_sim.py checks at its own,
smaller budget (with collapse 0.25 and with a 10x unstable option, accuracy and MCC). The sample prevalence also
varies from draw to draw (binomial); that is part of the finite-N sample, not of the targets.

The generator is pure numpy/scipy (sample_metrics, for the Monte Carlo checks, uses fewtune's own metric
definitions) and deterministic given the np.random.Generator passed in; mu is solved once per
(metric, target, tau, collapse) (functools.lru_cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binomtest

PREVALENCE = 0.69          # CoLA-like: share of gold label 1
MAJORITY = 1               # the majority class a collapsed run predicts everywhere
SHARED, OWN = 1.0, 0.7     # sd of the example ease shared by all options, and of each option's own part
EX_SD = math.hypot(SHARED, OWN)
METRICS = ("accuracy", "mcc")

NODES_SHIFT = 64
NODES_EASE = 80
_Z_SHIFT, _W_SHIFT = np.polynomial.hermite_e.hermegauss(NODES_SHIFT)
_W_SHIFT = _W_SHIFT / _W_SHIFT.sum()
_Z_EASE, _W_EASE = np.polynomial.hermite_e.hermegauss(NODES_EASE)
_W_EASE = _W_EASE / _W_EASE.sum()


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ----------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """A simulated family: one entry per option in `taus`, `targets`, `collapse`, `seed_free` (options "o0".."o{K-1}").

    taus: seed sd on the logit scale (0 for a seed-free option); targets: the true expected metric per option (over
    seeds and the example population, collapsed runs included); collapse: the probability a trained run predicts the
    majority class for every example (0 for a seed-free option); seed_free: the same predictions under every seed.
    max_seeds: the most seeds the benchmark gives an option in this scenario."""
    name: str
    metric: str
    taus: tuple[float, ...]
    targets: tuple[float, ...]
    collapse: tuple[float, ...]
    seed_free: tuple[bool, ...]
    n_examples: int = 200
    max_seeds: int = 4

    def __post_init__(self):
        for f in ("taus", "targets", "collapse"):
            object.__setattr__(self, f, tuple(float(x) for x in getattr(self, f)))
        object.__setattr__(self, "seed_free", tuple(bool(x) for x in self.seed_free))
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r}: one of {METRICS}")
        k = len(self.taus)
        if not k or any(len(getattr(self, f)) != k for f in ("targets", "collapse", "seed_free")):
            raise ValueError(f"{self.name}: taus, targets, collapse and seed_free need one entry per option")
        if any(t < 0 for t in self.taus) or any(not 0 <= p < 1 for p in self.collapse):
            raise ValueError(f"{self.name}: taus must be >= 0 and collapse shares in [0, 1)")
        for j, sf in enumerate(self.seed_free):
            if sf and (self.taus[j] != 0 or self.collapse[j] != 0):
                raise ValueError(f"{self.name}: seed-free option o{j} must have tau 0 and no collapse")
        if self.n_examples < 1 or self.max_seeds < 1:
            raise ValueError(f"{self.name}: n_examples and max_seeds must be positive")

    @property
    def n_options(self) -> int:
        return len(self.taus)

    @property
    def names(self) -> list[str]:
        return [f"o{k}" for k in range(self.n_options)]

    @property
    def label(self) -> str:
        """The name with the metric: unique across null_scenarios() + power_scenarios()."""
        return f"{self.name}, {'MCC' if self.metric == 'mcc' else 'accuracy'}"

    @property
    def mus(self) -> tuple[float, ...]:
        """The solved logit mean of each option (cached per option parameters)."""
        return tuple(solve_mu(self.metric, t, tau, p) for t, tau, p in zip(self.targets, self.taus, self.collapse))


NULL_TARGET = {"accuracy": 0.70, "mcc": 0.20}
POWER_GAP = {"accuracy": 0.12, "mcc": 0.15}


def _null(name, metric, trained_taus, collapse=0.0) -> Scenario:
    """Option 0 seed-free zero-shot, then the trained options with `trained_taus`, all with the same target."""
    taus = (0.0, *trained_taus)
    k = len(taus)
    return Scenario(name, metric, taus, (NULL_TARGET[metric],) * k, (0.0,) + (collapse,) * (k - 1),
                    (True,) + (False,) * (k - 1))


def null_scenarios() -> list[Scenario]:
    """All 8 options truly equal (accuracy 0.70; MCC 0.20): o0 seed-free zero-shot, o1..o7 trained.

    Per metric: "equal" (tau 0.3 for every trained option); one option (o7) far more unstable than the six others,
    "unstable 2x/5x/10x (τ 0.1)" (o1..o6 at 0.1, o7 at 0.2/0.5/1.0) and "unstable 2x/4x (τ 0.3)" (o7 at 0.6/1.2);
    "collapse 10 %/25 %/50 %" (tau 0.3, every trained run collapses to the majority class with that probability,
    the expected metric still equal)."""
    out = []
    for metric in METRICS:
        out.append(_null("equal", metric, (0.3,) * 7))
        for base, ratios in ((0.1, (2, 5, 10)), (0.3, (2, 4))):
            for r in ratios:
                out.append(_null(f"unstable {r}x (τ {base})", metric, (base,) * 6 + (round(base * r, 10),)))
        for share in (0.10, 0.25, 0.50):
            out.append(_null(f"collapse {round(100 * share)} %", metric, (0.3,) * 7, share))
    return out


def power_scenarios() -> list[Scenario]:
    """One truly better option: o0 trained (tau 0.3) at 0.82 accuracy (MCC: 0.35), the seven others at 0.70
    (MCC 0.20): o1 seed-free zero-shot, o2..o7 trained (tau 0.3); up to 4, 6 and 8 seeds."""
    out = []
    for metric in METRICS:
        base, gap = NULL_TARGET[metric], POWER_GAP[metric]
        targets = (round(base + gap, 10),) + (base,) * 7
        taus = (0.3, 0.0) + (0.3,) * 6
        what = f"+{round(100 * gap)} points" if metric == "accuracy" else f"+{gap:.2f}"
        for seeds in (4, 6, 8):
            out.append(Scenario(f"one better {what}, {seeds} seeds", metric, taus, targets, (0.0,) * 8,
                                (False, True) + (False,) * 6, max_seeds=seeds))
    return out


# ----------------------------------------------------------------------------- population values and mu
def rate_at(mu: float, shifts) -> np.ndarray:
    """a(shift): the population share of examples an option gets right at logit mean mu and seed shift(s)."""
    s = np.asarray(shifts, dtype=np.float64)
    return (_sigmoid(mu + s[..., None] + EX_SD * _Z_EASE) * _W_EASE).sum(-1)


def mcc_of_rate(a, prevalence: float = PREVALENCE):
    """The MCC of the population confusion matrix when both classes are right at rate a (symmetric correctness)."""
    a = np.asarray(a, dtype=np.float64)
    q = prevalence * a + (1 - prevalence) * (1 - a)
    return (2 * a - 1) * math.sqrt(prevalence * (1 - prevalence)) / np.sqrt(q * (1 - q))


def population_value(metric: str, mu: float, tau: float, collapse: float = 0.0) -> float:
    """The true expected metric of an option: over its seed shift N(0, tau²), the example population and collapse
    (probability `collapse` of a run predicting the majority class everywhere)."""
    a = rate_at(mu, tau * _Z_SHIFT)
    if metric == "accuracy":
        ok, collapsed = float((a * _W_SHIFT).sum()), PREVALENCE
    elif metric == "mcc":
        ok, collapsed = float((mcc_of_rate(a) * _W_SHIFT).sum()), 0.0
    else:
        raise ValueError(f"metric {metric!r}: one of {METRICS}")
    return collapse * collapsed + (1 - collapse) * ok


@lru_cache(maxsize=None)
def solve_mu(metric: str, target: float, tau: float, collapse: float = 0.0) -> float:
    """The logit mean whose population_value(metric, mu, tau, collapse) is `target` (brentq; cached)."""
    lo, hi = -15.0, 15.0
    f = lambda m: population_value(metric, m, tau, collapse) - target  # noqa: E731
    if not f(lo) < 0 < f(hi):
        raise ValueError(f"{metric} target {target} is out of reach with tau {tau} and collapse {collapse} "
                         f"(range {population_value(metric, lo, tau, collapse):.4f}.."
                         f"{population_value(metric, hi, tau, collapse):.4f})")
    return float(brentq(f, lo, hi, xtol=1e-13, rtol=1e-15, maxiter=200))


@lru_cache(maxsize=None)
def _arrays(scenario: Scenario):
    return (np.array(scenario.mus), np.array(scenario.taus), np.array(scenario.collapse),
            np.array(scenario.seed_free), bool(any(scenario.seed_free)))


# ----------------------------------------------------------------------------- simulation
def simulate(rng: np.random.Generator, scenario: Scenario, n_seeds: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One simulated family: gold [N] (0/1) and, per option in scenario order, predictions [n_seeds, N] (0/1).

    A seed-free option draws its predictions once and repeats them for every seed; a collapsed run predicts
    MAJORITY for every example. Deterministic given `rng`'s state (the draws depend on n_seeds)."""
    if n_seeds < 1:
        raise ValueError("n_seeds must be >= 1")
    mu, tau, collapse, seed_free, any_free = _arrays(scenario)
    k, n = len(mu), scenario.n_examples
    gold = (rng.random(n) < PREVALENCE).astype(np.int64)
    shared = rng.normal(0.0, SHARED, n)
    own = rng.normal(0.0, OWN, (k, n))
    shift = rng.standard_normal((k, n_seeds)) * tau[:, None]
    u = rng.random((k, n_seeds, n))
    collapsed = rng.random((k, n_seeds)) < collapse[:, None]
    if any_free:
        u[seed_free] = u[seed_free, :1]  # one draw, the same under every seed (its tau is 0: no shift)
    correct = u < _sigmoid((mu[:, None] + shift)[:, :, None] + (shared + own)[:, None, :])
    pred = np.where(correct, gold, 1 - gold)
    pred[collapsed] = MAJORITY
    return gold, list(pred)


# ----------------------------------------------------------------------------- the truth and claims
def truth(scenario: Scenario) -> dict[str, float]:
    """Option name ("o0".."o7") -> its true expected metric."""
    return dict(zip(scenario.names, scenario.targets))


def false_claims(worse: dict[str, str], equivalent: list[str], best: str | None, truth: dict[str, float],
                 margin: float | None) -> int:
    """How many claims the truth contradicts: "a is worse than b" (worse[a] = b) where truth[a] >= truth[b], and
    "o is equivalent to the best" where the true difference is the margin or more."""
    bad = sum(truth[a] >= truth[b] for a, b in worse.items())
    if equivalent:
        if best is None or margin is None:
            raise ValueError("an equivalence claim needs the best option and a margin")
        bad += sum(abs(truth[best] - truth[o]) >= margin for o in equivalent)
    return int(bad)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval for a binomial share k/n."""
    if n <= 0:
        return (0.0, 1.0)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def sample_metrics(gold: np.ndarray, preds: list[np.ndarray], metric: str) -> np.ndarray:
    """The metric of every run on the simulated sample: [options, seeds] (fewtune's own definition of the metric,
    fewtune.stats.stats.from_confusion; a constant prediction scores MCC 0)."""
    from fewtune.stats.stats import from_confusion

    p = np.stack(preds)                      # [K, S, N]
    g = gold.astype(bool)
    tp = (p & g).sum(-1)
    fn = (~p.astype(bool) & g).sum(-1)
    pos = p.sum(-1)
    n1 = int(g.sum())
    fp, tn = pos - tp, (len(gold) - n1) - (pos - tp)
    cm = np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], -2)   # rows gold (0, 1), columns predicted
    return from_confusion(cm, metric)


def mean_sample_metrics(rng: np.random.Generator, scenario: Scenario, draws: int, n_seeds: int = 4) -> np.ndarray:
    """Per option, the mean sample metric over `draws` simulated families of `n_seeds` seeds (Monte Carlo)."""
    total = np.zeros(scenario.n_options)
    for _ in range(draws):
        gold, preds = simulate(rng, scenario, n_seeds)
        total += sample_metrics(gold, preds, scenario.metric).mean(1)
    return total / draws


if __name__ == "__main__":  # the finite-N bias table: python tests/claims_sim.py [draws]
    import sys
    import time

    draws = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    for sc in null_scenarios() + power_scenarios():
        t0 = time.time()
        m = mean_sample_metrics(np.random.default_rng(12345), sc, draws, 8)
        bias = m - np.array(sc.targets)
        print(f"{sc.label:34s} bias per option (mean sample − target) {np.array2string(bias, precision=4)}  "
              f"spread {bias.max() - bias.min():.4f}  ({time.time() - t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- the procedure as the grid runs it
def until_resolved(gold, preds, max_seeds: int, metric: str = "accuracy", margin: float | None = None,
                   constant=None, futility: float | None = None):
    """fewtune's `--until-resolved` rule on simulated runs, round by round: every look is the answer's analysis
    under the spec's plan (fewtune.stats.sequential.sequential), and fewtune.grid.decide.allocate decides where
    the next seeds go, as the grid does; a seed-free option runs once. Returns (the last look's verdict, the runs
    used, whether it stopped early for futility)."""
    from fewtune.grid.decide import allocate
    from fewtune.stats import compare, sequential
    k_all = len(preds)
    constant = list(constant) if constant is not None else [False] * k_all
    futility = sequential.FUTILITY if futility is None else futility
    depth = [1] * k_all
    plan = sequential.Plan(max_seeds)
    names = [f"o{k}" for k in range(k_all)]
    while True:
        opts = [compare.OptionRuns(names[k], tuple(range(depth[k])), preds[k][:depth[k]], constant[k])
                for k in range(k_all)]
        v = sequential.sequential(gold, opts, 2, metric, margin, plan)
        a = allocate(v, dict(zip(names, depth)), {n: max_seeds for n in names},
                     {n for n, c in zip(names, constant) if c}, futility)
        nxt = [k for k in range(k_all) if names[k] in a.next and depth[k] < max_seeds and not constant[k]]
        if a.resolved or a.futile or not nxt:
            return v, sum(1 if constant[k] else depth[k] for k in range(k_all)), a.futile
        for k in nxt:
            depth[k] += 1


def run(scenario: Scenario, trials: int, seed: int = 0, futility: float | None = None, margin: float | None = None,
        max_seeds: int | None = None) -> dict:
    """`trials` simulated grids of `scenario` through until_resolved: the share with any false claim, how often the
    truly best option has the highest estimate, the share of truly worse options shown worse (the power), mean runs
    used, the share stopped early for futility."""
    rng = np.random.default_rng(seed)
    n = max_seeds or scenario.max_seeds
    t = truth(scenario)
    top = max(t.values())
    worse_truly = [o for o, v in t.items() if v < top]
    bad = found = shown = runs = futile = 0
    for _ in range(trials):
        gold, preds = simulate(rng, scenario, n)
        v, used, stopped = until_resolved(gold, preds, n, scenario.metric, margin, scenario.seed_free, futility)
        bad += false_claims(v.worse, v.equivalent_to_best, v.best, t, margin) > 0
        found += t.get(v.best, -math.inf) == top
        shown += sum(1 for o in v.worse if o in worse_truly)
        runs += used
        futile += stopped
    return {"trials": trials, "false": bad, "false_rate": bad / trials, "best_found": found / trials,
            "power": shown / (len(worse_truly) * trials) if worse_truly else math.nan, "runs": runs / trials,
            "futile": futile / trials, "max_runs": sum(1 if c else n for c in scenario.seed_free)}

"""Claims that survive selection (fewtune.stats.compare, fewtune.grid.decide.allocate): simulated families with a known truth.

The simulation is the demo's setting: 8 options, 200 evaluation examples with CoLA's class balance, up to 4 seeds.
Each example has an ease shared by every option and a part of its own per option (options disagree on some
examples); each trained option under each data seed gets a training-instability shift (seed-to-seed sd of accuracy
about 0.05, as seen in the demo); zero-shot is deterministic (the same predictions under every seed). "Equal" options
have the same accuracy over seeds and over the population of examples (each option's mean is solved for it).
Fixed seeds: deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

import claims_sim as cs
from fewtune.stats import compare, sequential

PREVALENCE = 0.69
SHARED, OWN = 1.0, 0.7
EX_SD = math.hypot(SHARED, OWN)
NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
WEIGHTS = WEIGHTS / WEIGHTS.sum()
DEMO_TAUS = (0.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3)  # zero-shot, then 7 trained options (logit scale: sd ~0.05 acc)
UNEQUAL_TAUS = (0.0, 0.1, 0.3, 0.3, 0.3, 0.5, 0.5, 0.3)  # instability differing 5x between trained options


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def true_accuracy(mu, sd):
    return float((sigmoid(mu + sd * NODES) * WEIGHTS).sum())


def mu_for(target, tau):
    """The logit mean whose accuracy over seeds and examples is `target` for instability `tau`."""
    return brentq(lambda m: true_accuracy(m, math.hypot(tau, EX_SD)) - target, -10, 10)


def simulate(rng, taus, targets, n_seeds, n_examples=200):
    """gold [N] and one [n_seeds, N] prediction array per option (option 0: deterministic when its tau is 0)."""
    gold = (rng.random(n_examples) < PREVALENCE).astype(int)
    shared = rng.normal(0, SHARED, n_examples)
    preds = []
    for tau, target in zip(taus, targets):
        mu = mu_for(target, tau)
        own = rng.normal(0, OWN, n_examples)
        if tau == 0:
            correct = np.repeat((rng.random(n_examples) < sigmoid(mu + shared + own))[None], n_seeds, 0)
        else:
            shift = rng.normal(0, tau, n_seeds)
            correct = rng.random((n_seeds, n_examples)) < sigmoid(mu + shift[:, None] + shared + own)
        preds.append(np.where(correct, gold, 1 - gold))
    return gold, preds


def options(preds, depth, constant=None):
    constant = constant or [False] * len(preds)
    return [compare.OptionRuns(f"o{k}", tuple(range(depth[k])), p[:depth[k]], constant[k]) for k, p in enumerate(preds)]


# ----------------------------------------------------------------------------- the whole rule, simulated
NULLS = {(s.name, s.metric): s for s in cs.null_scenarios()}


@pytest.mark.parametrize("name, metric, seed", [
    ("equal", "accuracy", 1), ("unstable 10x (τ 0.1)", "accuracy", 2), ("unstable 4x (τ 0.3)", "mcc", 3),
    ("collapse 50 %", "accuracy", 4), ("collapse 50 %", "mcc", 5), ("collapse 25 %", "mcc", 6)])
def test_equal_options_almost_never_get_a_false_claim_with_the_allocator_as_it_runs(name, metric, seed):
    """All 8 options truly equal (one seed-free), up to 4 seeds, `--until-resolved` as it runs (the looks, the plan,
    the futility rule): at most 5 % of 200 simulated grids end with any false claim, with one option 4-10x more
    unstable or a share of the trained runs collapsed (benchmarks/claims.py: 1,000 runs of every scenario)."""
    r = cs.run(NULLS[(name, metric)], 200, seed=seed)
    assert r["false_rate"] <= 0.05, r
    assert r["runs"] <= r["max_runs"]


def test_the_early_stop_comes_on_equal_options_and_not_when_one_is_far_better():
    """Equal options: most grids stop early (no comparison can be settled within 4 seeds), using fewer runs than
    the spec holds. One option 30 points better with 6 seeds: the others are shown worse, rarely an early stop."""
    equal = cs.run(NULLS[("equal", "accuracy")], 120, seed=8)
    assert equal["futile"] >= 0.5 and equal["runs"] < equal["max_runs"]
    far = cs.Scenario("one far better", "accuracy", (0.3, 0.0) + (0.3,) * 6, (0.95,) + (0.65,) * 7, (0.0,) * 8,
                      (False, True) + (False,) * 6, max_seeds=6)
    r = cs.run(far, 60, seed=9)
    assert r["futile"] <= 0.1 and r["power"] >= 0.8 and r["best_found"] >= 0.95 and r["false_rate"] <= 0.05


# ----------------------------------------------------------------------------- the critical values
@pytest.mark.parametrize("k, df", [(8, 3.0), (8, 12.0), (4, 2.5), (8, math.inf)])
def test_the_closure_critical_value_is_tukeys_at_all_equal_and_dunnetts_at_one(k, df):
    """critical(k, k, df) is scipy's studentized range / √2; critical(k, 1, df) makes scipy's multivariate t (normal)
    with correlation ½ over k − 1 comparisons hold with probability 0.95 (Hsu's MCB); in between it grows with m."""
    from scipy import stats as st
    q = st.studentized_range.ppf(0.95, k, df if math.isfinite(df) else 1e7) / math.sqrt(2)
    assert compare.critical(k, k, df) == pytest.approx(q, rel=1e-3)
    c1 = compare.critical(k, 1, df)
    cov = np.full((k - 1, k - 1), 0.5) + 0.5 * np.eye(k - 1)
    dist = st.multivariate_normal(cov=cov) if math.isinf(df) else st.multivariate_t(shape=cov, df=df)
    assert dist.cdf(np.full(k - 1, c1)) == pytest.approx(0.95, abs=2e-3)
    values = [compare.critical(k, m, df) for m in range(1, k + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_the_plan_spends_alpha_obrien_fleming_like_and_the_looks_add_up_to_alpha():
    four, eight = sequential.Plan(4), sequential.Plan(8)
    assert four.looks == (4,) and eight.looks == tuple(range(4, 9))
    assert four.share(4) == pytest.approx(0.05) and four.share(3) == 0.0
    assert sequential.Plan(6).share(4) == pytest.approx(0.0164, abs=1e-4)  # α(4/6) = 2 − 2Φ(1.96/√(2/3))
    assert sum(eight.share(n) for n in eight.looks) == pytest.approx(0.05)
    shares = [eight.share(n) for n in eight.looks]
    assert all(a < b for a, b in zip(shares, shares[1:]))  # early looks get little: the last keeps most of α
    assert sequential.Plan(3).looks == () and sequential.Plan(3).share(3) == 0.0


# ----------------------------------------------------------------------------- the closed procedure
def _brute_force_worse(v_diffs, names, k, alpha):
    """Closed testing by enumeration: i is worse when every S ∋ i is rejected, H_S rejected when some member is
    beaten at c_|S| (the definition; compare.family uses the shortcut through m*)."""
    from itertools import combinations

    def beaten(i, m):
        return any(d.value - d.half(compare.critical(k, m, d.df, alpha), compare.critical(k, m, math.inf, alpha)) > 0
                   for (j, ii), d in v_diffs.items() if ii == i)
    worse = set()
    for i in names:
        others = [n for n in names if n != i]
        if all(any(beaten(x, len(s) + 1) for x in (i, *s)) for m in range(k) for s in combinations(others, m)):
            worse.add(i)
    return worse


def test_the_shortcut_is_the_closed_test_it_stands_for():
    rng = np.random.default_rng(5)
    for trial in range(12):
        targets = list(rng.choice([0.6, 0.7, 0.8], 5))
        gold, preds = simulate(rng, (0.3,) * 5, targets, 4)
        opts = options(preds, [4] * 5)
        v = compare.family(gold, opts, 2, "accuracy")
        fit = compare.Fit(gold, opts, 2, "accuracy")
        diffs = {}
        for a in v.options:
            for b in v.options:
                if a != b:
                    diffs[(a, b)] = fit.pair(a, b)
        assert set(v.worse) == _brute_force_worse(diffs, v.options, 5, compare.ALPHA)


def test_an_unstable_option_widens_its_own_comparisons_and_no_variance_is_below_the_pool():
    """Own variances: an option 20x more unstable keeps its own, large variance and widens the contrasts it is in;
    every other option's variance is at least the family's pooled residual variance (the floor)."""
    rng = np.random.default_rng(7)
    taus = (0.05, 0.05, 0.05, 0.05, 1.0)
    gold, preds = simulate(rng, taus, [0.7] * 5, 6)
    fit = compare.Fit(gold, options(preds, [6] * 5), 2, "accuracy")
    var = fit.variances()
    assert var["o4"][0] > 3 * fit.sigma2 and var["o4"][1] < fit.df  # its own, on its own degrees of freedom
    assert all(var[n][0] >= fit.sigma2 - 1e-15 for n in ("o0", "o1", "o2", "o3"))
    stable, wild = fit.pair("o0", "o1"), fit.pair("o0", "o4")
    assert wild.seed_var > 2 * stable.seed_var and wild.df < stable.df


def test_a_trained_option_whose_seeds_agree_is_floored_never_zero_and_never_a_constant():
    """All 4 seeds of a trained option collapsed to the majority class: identical predictions, yet it is not a
    seed-free constant; its variance is the pooled one, and the verdict carries the warning."""
    rng = np.random.default_rng(11)
    gold, preds = simulate(rng, (0.3,) * 4, [0.7] * 4, 4)
    preds[2] = np.ones_like(preds[2])  # every run predicts the majority class for everything
    v = compare.family(gold, options(preds, [4] * 4), 2, "accuracy")
    fit = v.fit
    assert fit.constant == [False] * 4 and fit.collapsed == [False, False, True, False]
    assert fit.variances()["o2"] == (pytest.approx(fit.sigma2), fit.df)
    assert v.collapsed == ["o2"] and not v.constants
    assert fit.pair("o0", "o2").seed_var > 0


def test_a_constant_is_what_the_option_is_not_what_its_runs_did():
    rng = np.random.default_rng(53)
    gold, preds = simulate(rng, (0.0, 0.3, 0.3), [0.7, 0.7, 0.7], 3)
    fit = compare.Fit(gold, options(preds, [1, 3, 3], [True, False, False]), 2, "accuracy")
    assert fit.constant == [True, False, False] and fit.n == [1, 3, 3]
    d = fit.pair("o1", "o2")
    per_seed = (preds[1] == gold).mean(1) - (preds[2] == gold).mean(1)
    assert d.value == pytest.approx(per_seed.mean())
    z = fit.pair("o1", "o0")
    assert z.value == pytest.approx((preds[1] == gold).mean() - (preds[0][0] == gold).mean())
    assert z.seed_var == pytest.approx(np.var((preds[1] == gold).mean(1), ddof=1) / 3)  # o1's own, with β
    # the same runs without the flag: zero-shot's three identical runs are a trained option that agreed
    as_trained = compare.Fit(gold, options(preds, [3, 3, 3]), 2, "accuracy")
    assert as_trained.constant == [False] * 3 and as_trained.variances()["o0"][0] > 0


def test_fewer_than_four_seeds_claim_nothing_and_one_option_has_nothing_to_compare():
    rng = np.random.default_rng(43)
    gold, preds = simulate(rng, (0.3, 0.3), [0.5, 0.95], 3)
    v = compare.family(gold, options(preds, [3, 3]), 2, "accuracy")
    assert not v.worse and "3 seeds" in v.reason and not v.resolved
    assert compare.family(gold, options(preds, [3, 3]), 2, "accuracy").best == "o1"
    one = compare.family(gold, options(preds[:1], [3]), 2, "accuracy")
    assert "nothing to compare" in one.reason


def test_the_best_is_never_shown_worse_and_every_worse_claim_has_a_positive_lower_bound():
    rng = np.random.default_rng(47)
    for _ in range(40):
        gold, preds = simulate(rng, DEMO_TAUS, [0.6, 0.7, 0.7, 0.75, 0.8, 0.7, 0.65, 0.7], 5)
        depth = [1] + list(rng.integers(4, 6, 7))
        v = sequential.sequential(gold, options(preds, depth, [True] + [False] * 7), 2, "accuracy",
                                  plan=sequential.Plan(5))
        assert v.best not in v.worse
        for o in v.worse:
            if v.claimed_at.get(o) == max(depth):  # claimed at the last look: its interval shows it
                assert v.vs_best[o].diff.lo > 0


def test_within_the_margin_is_claimed_only_within_it():
    """Options 1 point apart and a margin of 10 points: within it with enough seeds; 15 points apart: never;
    without a margin nothing is called within one."""
    rng = np.random.default_rng(41)
    gold, preds = simulate(rng, (0.05,) * 3, [0.70, 0.71, 0.705], 8, n_examples=2000)
    v = compare.family(gold, options(preds, [8] * 3), 2, "accuracy", margin=0.10)
    assert set(v.equivalent_to_best) == {"o0", "o1", "o2"} - {v.best} and v.resolved
    assert not compare.family(gold, options(preds, [8] * 3), 2, "accuracy").equivalent_to_best
    gold, preds = simulate(rng, (0.05,) * 3, [0.70, 0.85, 0.84], 8, n_examples=2000)
    far = compare.family(gold, options(preds, [8] * 3), 2, "accuracy", margin=0.10)
    assert "o0" not in far.equivalent_to_best and "o0" in far.worse


def test_a_claim_made_at_an_earlier_look_stands():
    rng = np.random.default_rng(59)
    for _ in range(30):
        gold, preds = simulate(rng, (0.3,) * 4, [0.55, 0.8, 0.8, 0.8], 6)
        plan = sequential.Plan(6)
        early = sequential.sequential(gold, options(preds, [4] * 4), 2, "accuracy", plan=plan)
        if early.worse:
            break
    later = sequential.sequential(gold, options(preds, [4, 6, 6, 6]), 2, "accuracy", plan=plan)
    assert early.worse and set(early.worse) <= set(later.worse)
    assert all(later.claimed_at[o] == 4 for o in early.worse)


def test_a_seed_free_best_does_not_limit_how_far_a_comparison_can_reach():
    """Zero-shot (a constant, one run) as the highest estimate: the chance of settling it against a trained option
    is projected to the trained option's reach, not to the constant's single run."""
    rng = np.random.default_rng(61)
    gold, preds = simulate(rng, (0.0, 0.3, 0.3), [0.76, 0.70, 0.70], 8)
    opts = options(preds, [1, 2, 2], [True, False, False])
    v = sequential.sequential(gold, opts, 2, "accuracy", plan=sequential.Plan(8))
    assert v.best == "o0" and v.constants == ["o0"]
    near = sequential.chances(v, {"o0": 1, "o1": 4, "o2": 4})
    far = sequential.chances(v, {"o0": 1, "o1": 8, "o2": 8})
    assert far["o1"] > near["o1"] + 0.01, (near, far)

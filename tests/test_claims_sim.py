"""The simulated families of tests/claims_sim.py have the truth they claim: seed-free options are seed-free,
collapsed runs predict the majority class at the requested share, each option's mu gives its target, and options
with equal targets have equal mean sample metrics at 200 examples (Monte Carlo), for accuracy and MCC."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import beta

import claims_sim as cs
from fewtune.stats.stats import from_confusion

NULL = {sc.label: sc for sc in cs.null_scenarios()}
POWER = {sc.label: sc for sc in cs.power_scenarios()}


def test_simulate_is_deterministic_given_the_seed_and_gives_0_1_arrays_of_the_right_shape():
    sc = NULL["collapse 25 %, MCC"]
    a = cs.simulate(np.random.default_rng(5), sc, 4)
    b = cs.simulate(np.random.default_rng(5), sc, 4)
    c = cs.simulate(np.random.default_rng(6), sc, 4)
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(a[1], c[1]))
    gold, preds = a
    assert gold.shape == (200,) and len(preds) == 8
    assert all(p.shape == (4, 200) and set(np.unique(p)) <= {0, 1} for p in preds)
    assert set(np.unique(gold)) == {0, 1}


def test_a_seed_free_option_is_identical_under_every_seed_and_trained_options_are_not():
    rng = np.random.default_rng(7)
    for sc in (NULL["equal, accuracy"], POWER["one better +0.15, 8 seeds, MCC"]):
        gold, preds = cs.simulate(rng, sc, sc.max_seeds)
        for k, p in enumerate(preds):
            same = all(np.array_equal(p[0], p[s]) for s in range(1, len(p)))
            assert same == sc.seed_free[k], (sc.label, k)


def test_collapsed_runs_predict_the_majority_everywhere_at_the_requested_share():
    rng = np.random.default_rng(11)
    for share in (10, 25, 50):
        sc = NULL[f"collapse {share} %, accuracy"]
        collapsed = runs = 0
        for _ in range(300):
            gold, preds = cs.simulate(rng, sc, 4)
            assert not (preds[0] == cs.MAJORITY).all(1).any()  # the seed-free option never collapses
            allmaj = np.stack([(p == cs.MAJORITY).all(1) for p in preds[1:]])
            collapsed += int(allmaj.sum())
            runs += allmaj.size
            acc = np.stack([(p == gold).mean(1) for p in preds[1:]])
            assert np.allclose(acc[allmaj], gold.mean())  # a collapsed run's accuracy is the sample prevalence
        lo, hi = cs.clopper_pearson(collapsed, runs, 0.999)
        assert lo <= share / 100 <= hi, (share, collapsed / runs)
    # without collapse no run predicts one class everywhere
    gold, preds = cs.simulate(rng, NULL["unstable 10x (τ 0.1), accuracy"], 8)
    assert not any((p == p[:, :1]).all(1).any() for p in preds)


def _phi(z):
    return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _independent_value(metric, mu, tau, collapse):
    """The option's true expected metric by adaptive quadrature (scipy.integrate.quad, not Gauss-Hermite), MCC from
    the population confusion matrix by fewtune's own MCC (not claims_sim's closed form)."""
    def rate(s):
        return integrate.quad(lambda z: _phi(z) / (1 + math.exp(-(mu + s + cs.EX_SD * z))), -12, 12,
                              epsabs=1e-13, epsrel=1e-12)[0]

    def mcc(s):
        a, p = rate(s), cs.PREVALENCE
        cm = np.array([[(1 - p) * a, (1 - p) * (1 - a)], [p * (1 - a), p * a]])  # rows gold 0/1, columns predicted
        return float(from_confusion(cm, "mcc"))

    if tau == 0:
        ok = rate(0.0) if metric == "accuracy" else mcc(0.0)
    elif metric == "accuracy":
        sd = math.hypot(tau, cs.EX_SD)
        ok = integrate.quad(lambda z: _phi(z) / (1 + math.exp(-(mu + sd * z))), -12, 12, epsabs=1e-13)[0]
    else:
        ok = integrate.quad(lambda z: _phi(z) * mcc(tau * z), -10, 10, epsabs=1e-10, epsrel=1e-10)[0]
    return collapse * (cs.PREVALENCE if metric == "accuracy" else 0.0) + (1 - collapse) * ok


def test_each_options_mu_gives_its_target_to_1e_6():
    for sc in [*cs.null_scenarios(), *cs.power_scenarios()]:
        for mu, tau, p, target in zip(sc.mus, sc.taus, sc.collapse, sc.targets):
            assert abs(cs.population_value(sc.metric, mu, tau, p) - target) < 1e-6, sc.label
    # checked by an independent integration where the quadrature is hardest (the widest shift, the most collapse)
    for label in ("unstable 10x (τ 0.1)", "unstable 4x (τ 0.3)", "collapse 50 %"):
        for metric in ("accuracy", "MCC"):
            sc = NULL[f"{label}, {metric}"]
            for k in (0, 7):
                value = _independent_value(sc.metric, sc.mus[k], sc.taus[k], sc.collapse[k])
                assert abs(value - sc.targets[k]) < 1e-6, (sc.label, k, value)
    assert cs.solve_mu.cache_info().hits > 0  # each option's mu is solved once


def test_each_null_scenario_truly_has_equal_targets_and_the_parameters_its_name_says():
    assert len(NULL) == 18 and len(POWER) == 6  # labels are unique
    for sc in NULL.values():
        assert sc.n_options == 8 and sc.n_examples == 200 and sc.max_seeds == 4
        assert len(set(cs.truth(sc).values())) == 1 and list(cs.truth(sc)) == [f"o{k}" for k in range(8)]
        assert sc.targets[0] == {"accuracy": 0.70, "mcc": 0.20}[sc.metric]
        assert sc.seed_free == (True,) + (False,) * 7 and sc.taus[0] == 0 and sc.collapse[0] == 0
        trained = sc.taus[1:]
        if m := re.fullmatch(r"unstable (\d+)x \(τ ([\d.]+)\)", sc.name):
            assert set(trained[:6]) == {float(m[2])} and trained[6] == pytest.approx(int(m[1]) * float(m[2]))
        elif m := re.fullmatch(r"collapse (\d+) %", sc.name):
            assert set(sc.collapse[1:]) == {int(m[1]) / 100} and set(trained) == {0.3}
        else:
            assert sc.name == "equal" and set(trained) == {0.3} and set(sc.collapse) == {0.0}
    for sc in POWER.values():
        t = cs.truth(sc)
        assert max(t, key=t.get) == "o0" and len(set(sc.targets[1:])) == 1 and not sc.seed_free[0]
        assert sc.targets[0] - sc.targets[1] == pytest.approx(0.12 if sc.metric == "accuracy" else 0.15)
    assert sorted(sc.max_seeds for sc in POWER.values()) == [4, 4, 6, 6, 8, 8]


DRAWS = {"accuracy": 3000, "mcc": 8000}  # Monte Carlo SE of an option's mean: ~0.0005 (accuracy), ~0.0006 (MCC)


@pytest.mark.parametrize("label", ["collapse 25 %, accuracy", "collapse 25 %, MCC",
                                   "unstable 10x (τ 0.1), accuracy", "unstable 10x (τ 0.1), MCC"])
def test_equal_targets_give_equal_mean_sample_metrics_at_200_examples(label):
    """Monte Carlo: the mean sample metric (over draws and seeds) of the 8 equal options agrees within 0.005, and
    a ninth option 0.01 better (like o7) is seen 0.01 ± 0.004 better: the check resolves differences this small."""
    sc = NULL[label]
    k = sc.n_options
    plus = dataclasses.replace(sc, taus=sc.taus + sc.taus[-1:], targets=sc.targets + (sc.targets[-1] + 0.01,),
                               collapse=sc.collapse + sc.collapse[-1:], seed_free=sc.seed_free + (False,))
    mean = cs.mean_sample_metrics(np.random.default_rng(101), plus, DRAWS[sc.metric], 8)
    equal = mean[:k]
    assert equal.max() - equal.min() < 0.005, equal
    assert abs(mean[k] - equal[1:].mean() - 0.01) < 0.004, mean
    # and near the population target (accuracy: unbiased; MCC: the sample MCC's finite-N bias is small)
    assert np.abs(equal - sc.targets[0]).max() < (0.004 if sc.metric == "accuracy" else 0.005), equal



def test_false_claims_counts_what_the_truth_contradicts():
    t = {"o0": 0.8, "o1": 0.7, "o2": 0.7, "o3": 0.75}
    assert cs.false_claims({}, [], None, t, None) == 0
    assert cs.false_claims({"o1": "o0", "o2": "o3"}, [], "o0", t, None) == 0       # both true
    assert cs.false_claims({"o1": "o2", "o0": "o3", "o2": "o0"}, [], "o0", t, None) == 2  # equal, and reversed
    assert cs.false_claims({}, ["o3", "o1"], "o0", t, 0.06) == 1                  # 0.05 within, 0.10 beyond
    assert cs.false_claims({}, ["o3"], "o0", t, 0.05) == 1                        # exactly the margin: not within
    with pytest.raises(ValueError):
        cs.false_claims({}, ["o3"], "o0", t, None)


def test_clopper_pearson_is_the_exact_beta_interval():
    for k, n in ((0, 10), (3, 10), (10, 10), (47, 1000)):
        lo, hi = cs.clopper_pearson(k, n)
        assert lo == pytest.approx(beta.ppf(0.025, k, n - k + 1) if k else 0.0, abs=1e-9)
        assert hi == pytest.approx(beta.ppf(0.975, k + 1, n - k) if k < n else 1.0, abs=1e-9)
    assert cs.clopper_pearson(5, 100, 0.99)[1] > cs.clopper_pearson(5, 100)[1]
    assert cs.clopper_pearson(0, 0) == (0.0, 1.0)


def test_scenarios_reject_inconsistent_parameters():
    with pytest.raises(ValueError, match="seed-free"):
        cs.Scenario("x", "accuracy", (0.3, 0.3), (0.7, 0.7), (0, 0), (True, False))
    with pytest.raises(ValueError, match="one entry per option"):
        cs.Scenario("x", "accuracy", (0.3,), (0.7, 0.7), (0, 0), (False, False))
    with pytest.raises(ValueError, match="out of reach"):
        cs.solve_mu("accuracy", 0.70, 0.3, 0.99)  # 99 % collapse at 0.69 cannot average 0.70

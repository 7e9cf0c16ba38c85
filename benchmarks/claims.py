"""How often fewtune's claims are wrong, and how often they are made: the simulation of tests/test_compare.py at
more trials and more sizes (docs/statistics.md quotes its output).

Run:  python benchmarks/claims.py [--trials 1000]      (CPU only; ~10-20 min on 2 cores)

Prints, for 8 options, 200 evaluation examples and `--until-resolved` as it runs (decide.allocate):
- the share of runs with any false claim when all options are equal (zero-shot deterministic, 7 trained options
  with a seed-to-seed sd of ~0.05 accuracy; then with 5x differing instability; then by MCC);
- with one option 12 accuracy points better: how often it has the highest estimate, the share of the 7 others
  shown worse (the power), at 4-16 seeds and 200-1,000 examples, so you can read what reaches 80 %.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_compare import DEMO_TAUS, UNEQUAL_TAUS, false_claims, simulate, until_resolved  # noqa: E402


def run(taus, targets, trials, max_seeds=4, n_examples=200, metric="accuracy", seed=0):
    rng = np.random.default_rng(seed)
    truth = {f"o{k}": t for k, t in enumerate(targets)}
    bad = found = shown = runs = 0
    for _ in range(trials):
        gold, preds = simulate(rng, taus, targets, max_seeds, n_examples)
        v, used = until_resolved(gold, preds, max_seeds, metric)
        bad += false_claims(v, truth) > 0
        found += v.best == "o0"
        shown += sum(1 for w, b in v.worse.items() if truth[b] > truth[w])
        runs += used
    return {"false": bad / trials, "best_found": found / trials, "power": shown / ((len(taus) - 1) * trials),
            "runs": runs / trials}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.time()
    equal = [0.7] * 8
    for name, taus, metric in (("equal, demo instability", DEMO_TAUS, "accuracy"),
                               ("equal, 5x differing instability", UNEQUAL_TAUS, "accuracy"),
                               ("equal, demo instability, MCC", DEMO_TAUS, "mcc")):
        r = run(taus, equal, args.trials, metric=metric, seed=1)
        print(f"{name}: runs with any false claim {100 * r['false']:.1f} % ({args.trials} runs, 8 options, "
              f"200 examples, up to 4 seeds; {r['runs']:.1f} runs used of 32)", flush=True)
    better = [0.82] + [0.7] * 7
    for seeds, n in ((4, 200), (6, 200), (8, 200), (12, 200), (16, 200), (4, 1000), (8, 1000)):
        r = run((0.3,) * 8, better, max(args.trials // 4, 100), seeds, n, seed=2)
        print(f"one option +12 points, up to {seeds} seeds, {n} examples: found best {100 * r['best_found']:.0f} %, "
              f"others shown worse {100 * r['power']:.0f} % (power), any false claim {100 * r['false']:.1f} %, "
              f"{r['runs']:.1f} runs", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often fewtune's claims are wrong, and how often they are made: the procedure of `--until-resolved` as it runs
(fewtune.stats.sequential's looks and plan, fewtune.grid.decide.allocate with the futility rule) on simulated grids
with a known truth (tests/claims_sim.py: the data generator, with unstable and collapsing fine-tuning runs).
docs/statistics.md quotes its tables.

Run:  python benchmarks/claims.py [--trials 1000] [--power-trials 250] [--only nulls|power] [--workers 2]

Prints two tables (CPU only; about 40 min on 2 cores at the defaults):
- null scenarios (every option truly equal; 8 options, one seed-free; 200 examples; up to 4 seeds): the share of
  grids with any false claim with its 95 % Clopper–Pearson interval, mean runs used, the share stopped early;
- power (one option truly better: +12 accuracy points or +0.15 MCC; up to 4, 6, 8 seeds): how often it has the
  highest estimate, the share of the seven others shown worse, false claims, runs used, early stops; with the
  futility rule and without it (--futility 1e-9: every open comparison gets seeds).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import claims_sim as cs  # noqa: E402


def _one(job):
    scenario, trials, seed, futility = job
    t0 = time.time()
    r = cs.run(scenario, trials, seed=seed, futility=futility)
    r["seconds"] = time.time() - t0
    return scenario, futility, r


def _table(rows, head):
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000, help="simulated grids per null scenario [1000]")
    ap.add_argument("--power-trials", type=int, default=250, help="simulated grids per power scenario [250]")
    ap.add_argument("--only", choices=["nulls", "power"])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    t0 = time.time()
    jobs = []
    if args.only != "power":
        jobs += [(s, args.trials, 100 + i, None) for i, s in enumerate(cs.null_scenarios())]
    if args.only != "nulls":
        for i, s in enumerate(cs.power_scenarios()):
            jobs += [(s, args.power_trials, 200 + i, None), (s, args.power_trials, 200 + i, 1e-9)]
    with ProcessPoolExecutor(args.workers) as pool:
        done = list(pool.map(_one, jobs))
    nulls = [(s, r) for s, f, r in done if s in cs.null_scenarios()]
    if nulls:
        print(f"\nNull scenarios: every option truly equal (8 options, o0 seed-free; 200 examples; up to 4 seeds; "
              f"{args.trials} grids each)\n")
        rows = []
        for s, r in nulls:
            lo, hi = cs.clopper_pearson(r["false"], r["trials"])
            rows.append([s.name, s.metric, f"{100 * r['false_rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]",
                         f"{r['runs']:.1f} of {r['max_runs']}", f"{100 * r['futile']:.0f} %"])
        _table(rows, ["scenario", "metric", "any false claim [95 % CI]", "runs used", "stopped early"])
    power = [(s, f, r) for s, f, r in done if s not in cs.null_scenarios()]
    if power:
        print(f"\nPower: o0 truly better, the 7 others equal (o1 seed-free); 200 examples; "
              f"{args.power_trials} grids each\n")
        rows = []
        for s, f, r in power:
            rows.append([s.name, s.metric, "off" if f else "0.2", f"{100 * r['best_found']:.0f} %",
                         f"{100 * r['power']:.1f} %", f"{100 * r['false_rate']:.1f} %",
                         f"{r['runs']:.1f} of {r['max_runs']}", f"{100 * r['futile']:.0f} %"])
        _table(rows, ["scenario", "metric", "futility", "highest estimate", "others shown worse (power)",
                      "any false claim", "runs used", "stopped early"])
    print(f"\n({time.time() - t0:.0f} s, {args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

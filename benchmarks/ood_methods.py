"""Time and peak memory of one run of probe, lpft and bitfit beside ft (and what each trains and ships).

Each method runs as `fewtune run` in a fresh process (so the peak memory, the process's RSS, is its own), one after
the other, on the same sample: by default a 32-shot CoLA run of the bundled model under `--preset quick`, 100
evaluation examples per split, retention off. Prints the CPU (lscpu's model name), the load average before and
after (the machine may be shared: the times are wall clock; each process's CPU seconds, imports to result, are less
sensitive to that), and one row per method; writes the rows as JSON.

    python benchmarks/ood_methods.py                     # ft, probe, lpft, bitfit (norm weights) on CoLA
    python benchmarks/ood_methods.py --reps 2 --out results/ood_methods.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

# label -> the method's flags; bitfit trains the norm weights: the bundled SmolLM2 has no bias terms
METHODS = {"ft": ["--method", "ft"], "probe": ["--method", "probe"], "lpft": ["--method", "lpft"],
           "bitfit": ["--method", "bitfit", "--bitfit-params", "norm"]}
COLUMNS = ("train_seconds", "train_peak_memory_mib", "peak_memory_mib", "trainable_params", "shipped_bytes",
           "eval_seconds", "predict_seconds_per_1k")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_one(label: str, args, folder: Path) -> dict:
    out = folder / f"{label}.json"
    argv = [sys.executable, "-m", "fewtune", "run", *METHODS[label], "--task", args.task, "--model", args.model,
            "--shots", str(args.shots), "--seed", str(args.seed), "--preset", "quick", "--eval-limit",
            str(args.eval_limit), "--retention-text", "off", "-q", "-o", str(out)]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    if args.threads:
        argv = ["env", f"OMP_NUM_THREADS={args.threads}"] + argv
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    r = json.loads(out.read_text())
    # the whole process's CPU time (imports, load, training, scoring): unlike wall clock, little changed by other
    # work on a shared machine
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"method": label, **{k: r["cost"].get(k) for k in COLUMNS}, "process_cpu_seconds": round(cpu, 1),
           "wall_seconds": r.get("wall_seconds"), "dtype": r["dtype"],
           "primary_id": next(e[r["task"]["primary_metric"]] for e in r["evals"].values() if e["role"] == "in_domain"),
           "primary_ood": next((e[r["task"]["primary_metric"]] for e in r["evals"].values()
                                if e["role"] == "out_of_domain"), None)}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--task", default="cola")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-root")
    p.add_argument("--shots", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=100)
    p.add_argument("--reps", type=int, default=1, help="runs of each method, interleaved (ft, probe, ..., ft, ...)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs [torch's default: the cores]")
    p.add_argument("--out", help="write the rows here (JSON)")
    args = p.parse_args(argv)
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    header = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load(), "task": args.task,
              "model": args.model, "shots": args.shots, "eval_limit": args.eval_limit}
    print(f"CPU: {header['cpu']} ({header['cores']} cores); load average before: {header['load_before']}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for label in labels:
                rows.append({"rep": rep, **run_one(label, args, Path(tmp))})
                r = rows[-1]
                print(f"{label:7s} rep {rep}: train {r['train_seconds']:8.2f} s  train peak {r['train_peak_memory_mib']:7.0f} MiB"
                      f"  peak {r['peak_memory_mib']:7.0f} MiB  process CPU {r['process_cpu_seconds']:7.1f} s  trainable {r['trainable_params']:>11,}  shipped "
                      f"{r['shipped_bytes'] / 2**20:9.3f} MiB  eval {r['eval_seconds']:6.1f} s  "
                      f"{header['task']} id {r['primary_id']:+.3f} ood {r['primary_ood'] if r['primary_ood'] is None else format(r['primary_ood'], '+.3f')}",
                      flush=True)
    header["load_after"] = load()
    print(f"load average after: {header['load_after']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

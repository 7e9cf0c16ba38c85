"""`fewtune grid`, `fewtune results`, `fewtune report`: the study in one command, its database, its report.

Registered in cli.py through EXTENSIONS; see docs/grid.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .errors import FewtuneError
from .grid.estimate import PROBE_EVAL_LIMIT
from .store import STATUSES, default_path

RESULT_COLUMNS = ("config_hash", "status", "label", "task", "model", "shots", "seed", "primary_metric", "id_primary",
                  "ood_primary", "id_accuracy", "ood_accuracy", "train_seconds", "peak_memory_mib", "error")


def add_parser(sub) -> None:
    db_help = "results database [$FEWTUNE_DB or results/fewtune.db]"
    g = sub.add_parser("grid", help="run every cell of an experiment grid (spec file or preset: demo, cpu, paper)")
    g.add_argument("spec", help="grid spec (TOML file) or the name of a shipped one: demo, cpu, paper")
    g.add_argument("--db", help=db_help)
    g.add_argument("--dry-run", action="store_true",
                   help="list the cells and their status, and estimate the time per backend and worker count from "
                        "stored timings of similar cells (same option, model, task); run nothing")
    g.add_argument("--probe", action="store_true",
                   help=f"with --dry-run: first run one real cell of each kind with no stored timing here, scoring at "
                        f"most {PROBE_EVAL_LIMIT} examples per split (in a temporary folder; the database is not "
                        "written), and estimate from it")
    g.add_argument("--in-process", action="store_true",
                   help="run cells in this process, not one child process each (debugging; a crash ends the grid)")
    g.add_argument("--reclaim", action="store_true",
                   help="also re-run cells marked running by a live process or another host (it must be gone)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar; one line per cell")
    g.add_argument("--backend", choices=["process", "warm", "ray", "ray-warm", "local"], default="process",
                   help="process: each cell in a fresh child process (isolated; pays imports and model loading per "
                        "cell); warm: --workers processes that keep the model loaded and run many cells each (same "
                        "results, less start-up); ray: every cell a task on a Ray cluster (pip install 'fewtune[ray]'); "
                        "ray-warm: warm workers as Ray actors with the spec's [resources] (num_gpus = 0.25: four "
                        "share a GPU); local = process [process]")
    g.add_argument("--workers", type=int,
                   help="process/warm: cells at once on this machine, each with its share of the CPU cores as threads "
                        "(on GPUs: several per device, by default as many as free memory holds) [spec workers, 1]")
    g.add_argument("--cell-timeout", help="process/warm/ray-warm: a cell with no result after this long (e.g. 30m) is "
                                          "killed and retried or recorded failed [no limit]")
    g.add_argument("--address", help="ray/ray-warm: the cluster, auto or HOST:PORT [$RAY_ADDRESS, a running local Ray, "
                                     "else a new local one]")
    g.add_argument("--max-retries", type=int, help="re-runs of a cell whose worker process died (killed, out of "
                                                   "memory, hung) [spec max_retries; process 0, warm 1, ray and "
                                                   "ray-warm 2]")
    g.add_argument("--models", help="replace the spec's models, comma-separated (e.g. fewtune grid paper --models "
                                    "smollm2-135m,gemma3-270m: the study's design on the bundled models)")
    g.add_argument("--opt-in", help="add the spec's opt-in method lists of these names, comma-separated (e.g. "
                                    "fewtune grid paper --opt-in ood: probe, lpft and bitfit beside the study's methods)")
    g.add_argument("--max-cells", type=int, help="refuse a spec that expands to more cells than this [10000]")
    g.add_argument("--until-resolved", action="store_true",
                   help="run seeds of every option until 4 can be judged, then more seeds only where a comparison "
                        "with the best is open and can still be settled (docs/grid.md); ends with the answer, or "
                        "early with what it would take")
    g.add_argument("--time-budget", help="with --until-resolved: stop starting runs after this long, e.g. 15m, 1h30m "
                                         "[no limit]")
    g.add_argument("--equivalence-margin", type=float,
                   help="with --until-resolved: options are called equivalent only when their simultaneous interval "
                        "lies within ±this (the primary metric's units), fixed before the run [each task's "
                        "equivalence_margin]")
    g.add_argument("--futility", type=float, default=None,
                   help="with --until-resolved: an open comparison whose chance to be settled within the spec's "
                        "seeds and the time budget is below this gets no more seeds; the grid stops when none "
                        "reaches it (docs/statistics.md, Futility) [0.2]")

    r = sub.add_parser("results", help="list or export the runs in the results database")
    r.add_argument("--db", help=db_help)
    r.add_argument("--format", choices=["table", "csv", "json", "jsonl", "parquet"],
                   help="table, csv, json, parquet for runs [table]; jsonl, csv, parquet with --predictions [jsonl]")
    r.add_argument("--output", "-o", help="write here [stdout; required for parquet]")
    r.add_argument("--status", help=f"comma-separated statuses to keep ({', '.join(STATUSES)}) [all]")
    r.add_argument("--predictions", action="store_true",
                   help="export the per-example predictions instead: one row per run x evaluation example")
    r.add_argument("--findings", metavar="FILE|study",
                   help="with --format json: print {\"runs\": [...], \"findings\": {...}}, the findings file's verdicts "
                        "(docs/findings.md); without it json stays the list of runs")

    p = sub.add_parser("report", help="write report.md and a self-contained report.html from the results database")
    p.add_argument("--db", help=db_help)
    p.add_argument("--out", help="output folder [report/ next to the database: results/report]")
    p.add_argument("--predictions-per-day", type=float,
                   help="budget the cost of use: training plus this many predictions a day, over --days")
    p.add_argument("--days", type=float, default=30.0, help="with --predictions-per-day: the horizon [30]")
    p.add_argument("--max-latency-ms", type=float,
                   help="leave out of 'which method' the options slower than this per prediction (as measured)")
    p.add_argument("--max-retention-loss", type=float,
                   help="leave out of 'which method' the options whose LM loss on the retention text rose by more "
                        "than this (nats/token, ≥ 0; options without a measurement too)")
    p.add_argument("--equivalence-margin", type=float,
                   help="options are called equivalent only when their simultaneous interval lies within ±this (the "
                        "primary metric's units); set it before looking at the results [each task's "
                        "equivalence_margin]")
    p.add_argument("--findings", metavar="FILE|study|none",
                   help="the claims that open the report, judged on these results (docs/findings.md) [the shipped "
                        "study's, for the tasks it covers: cola, mnli]")


def db_path(args) -> Path:
    return Path(args.db) if args.db else default_path()


def cmd_grid(args) -> int:
    import os

    from .grid import MAX_CELLS, RUNNER_ENV, Interrupted, check_max_retries, check_models, load_grid, signals_raise
    from .store import Store
    if args.max_cells is not None and args.max_cells < 1:
        raise FewtuneError(f"--max-cells must be ≥ 1, got {args.max_cells}.")
    backend_name = "process" if args.backend == "local" else args.backend
    if args.workers is not None and args.workers < 1:
        raise FewtuneError(f"--workers must be ≥ 1, got {args.workers}.")
    models = None
    if args.models is not None:  # the study's design on another model: fewtune grid paper --models smollm2-135m
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise FewtuneError("--models needs at least one model: a bundled name, a folder or a Hub id, comma-separated.")
        twice = next((m for i, m in enumerate(models) if m in models[:i]), None)
        if twice is not None:  # (the spec's own `models` list is checked by load_grid, in the spec's words)
            raise FewtuneError(f"--models lists {twice!r} twice; remove the duplicate.")
    opt_in = None
    if args.opt_in is not None:
        opt_in = [m.strip() for m in args.opt_in.split(",") if m.strip()]
        if not opt_in:
            raise FewtuneError("--opt-in needs the name of at least one of the spec's opt-in method lists.")
    grid = load_grid(args.spec, max_cells=args.max_cells or MAX_CELLS, models=models, opt_in=opt_in)
    path = db_path(args)
    if args.max_retries is not None:
        check_max_retries(args.max_retries, "--max-retries")
    on_ray = backend_name in ("ray", "ray-warm")
    if on_ray:
        refused = [("in_process", "--in-process runs cells in this process"),
                   ("workers", "--workers sets how many cells run at once on this machine; on Ray the spec's "
                               "[resources] decide it")]
        if backend_name == "ray":  # a task's worker is Ray's to stop; an actor is ours (ray-warm)
            refused.append(("cell_timeout", "--cell-timeout applies to the process, warm and ray-warm backends"))
        for flag, what in refused:
            if getattr(args, flag):
                raise FewtuneError(f"{what}; it does not go with --backend {backend_name}.")
        if not args.dry_run:  # not installed, or no cluster there: say so before the database is touched
            from .grid.ray_backend import check_address, import_ray
            import_ray()
            check_address(args.address)
    else:
        if args.address is not None:
            raise FewtuneError("--address applies to --backend ray and ray-warm only.")
        if args.in_process and (backend_name == "warm" or args.workers not in (None, 1)):
            raise FewtuneError("--in-process runs one cell at a time in this process; it does not go with "
                               "--backend warm or --workers.")
    cell_timeout = None
    if args.cell_timeout is not None:
        from .grid.decide import parse_duration
        cell_timeout = parse_duration(args.cell_timeout, "--cell-timeout")
    budget_s = None
    if args.time_budget is not None and not args.until_resolved:
        raise FewtuneError("--time-budget goes with --until-resolved (a plain grid runs every cell).")
    if args.equivalence_margin is not None and not args.until_resolved:
        raise FewtuneError("--equivalence-margin goes with --until-resolved (or `fewtune report`); a plain grid "
                           "makes no claims.")
    if args.futility is not None and not args.until_resolved:
        raise FewtuneError("--futility goes with --until-resolved (a plain grid runs every cell).")
    if args.until_resolved:
        from .grid.decide import check_futility, options_of, parse_duration
        if args.futility is not None:
            check_futility(args.futility)
        budget_s = parse_duration(args.time_budget) if args.time_budget is not None else math.inf
        options_of(grid)  # at least two options and two seeds: say so before anything runs
        if args.equivalence_margin is not None:
            from .tasks import check_margin, load_task
            for task in dict.fromkeys(c.config.task for c in grid.cells):
                check_margin(args.equivalence_margin, load_task(task).primary_metric, "--equivalence-margin")
    if not os.environ.get(RUNNER_ENV):  # a plug-in runner decides what its model names mean
        check_models(grid)
    if args.probe and not args.dry_run:
        raise FewtuneError("--probe goes with --dry-run (it times one cell of each kind to estimate the grid).")
    workers = args.workers if args.workers is not None else grid.workers
    # where the number came from, for the error when the machine cannot hold it: the flag, or the spec's key
    asked = f"{grid.source}: workers = {workers}" if args.workers is None and workers is not None else None
    use_gpu = None  # None: no plan here (Ray's [resources] decide; --in-process runs one cell at a time)
    if not on_ray and not args.in_process:
        use_gpu = any(c.config.device in ("auto", "cuda") or str(c.config.device).startswith("cuda") for c in grid.cells)
    if args.dry_run:
        return dry_run(grid, path, backend_name, workers, use_gpu, args.probe, cell_timeout, asked)
    plan = need = None
    if use_gpu is not None:
        from .grid.backends import visible_gpus
        gpus = visible_gpus(use_gpu)
        # on a GPU the worker's need comes from measured peaks of stored runs; on CPU it needs no stored run
        status, rows = stored_runs(path) if gpus else ({}, [])
        plan, need = worker_plan([c for c in grid.cells if status.get(c.key) != "success"] or grid.cells, rows,
                                 workers, gpus, asked=asked)
    with Store(path) as store:
        # the looks of this grid's claims follow its seeds (fewtune.stats.sequential.Plan): kept for the report
        store.set_meta(f"seeds:{grid.name}", json.dumps(grid.seed_order()))
        if grid.findings is not None:  # `fewtune report` on this database judges the spec's findings by default
            from .findings import findings_ref
            store.set_meta("findings", findings_ref(grid.findings))
        print(f"grid {grid.name} ({grid.source}): {len(grid.cells)} cells; database {path}; "
              f"logs {path.parent / 'logs'}" + (f"; {plan.workers} {backend_name} workers × {plan.threads} threads"
                                                if plan and plan.workers > 1 else "")
              + (f"; per worker on a GPU: {need.says}" if plan and any(d is not None for d in plan.devices) else ""),
              file=sys.stderr)
        try:
            progress = not args.quiet and sys.stderr.isatty()
            echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
            with signals_raise():
                backend = make_backend(backend_name, grid, plan, args.in_process, args.address, cell_timeout)
                retries = args.max_retries if args.max_retries is not None else grid.max_retries
                if args.until_resolved:
                    from .grid.decide import run_until_resolved
                    d = run_until_resolved(grid, store, path.parent / "logs", budget_s, echo=echo,
                                           reclaim=args.reclaim, backend=backend, retries=retries,
                                           equivalence_margin=args.equivalence_margin,
                                           **({"futility": args.futility} if args.futility is not None else {}))
                    print(f"grid {grid.name}: {'resolved' if d.resolved else 'not resolved'} after {d.rounds} round(s), "
                          f"{d.runs} run(s) in {d.seconds:.0f} s; `fewtune report --db {path}` for the tables")
                    return 0
                from .grid import run_grid
                s = run_grid(grid, store, path.parent / "logs", reclaim=args.reclaim, progress=progress, echo=echo,
                             backend=backend, retries=retries)
        except Interrupted as e:
            print(f"fewtune: grid interrupted ({e}); rerun the same command to resume", file=sys.stderr)
            return 128 + e.signum
    print(f"grid {grid.name}: {s.total} cells: {s.done_before} done before, {s.success} succeeded now, "
          f"{s.failed} failed" + (f", {s.busy} running elsewhere" if s.busy else "")
          + (f", {s.lost} finished but not recorded (taken over by another grid)" if s.lost else "")
          + (f" (see `fewtune results --status failed --db {path}`)" if s.failed else ""))
    return 1 if s.failed or s.lost else 0


def make_backend(name: str, grid, plan, in_process: bool, address: str | None, cell_timeout: float | None):
    """The backend that runs the cells (backends.py, ray_backend.py); the driver is the same for all."""
    from .grid.backends import InlineBackend, ProcessBackend, WarmBackend
    if name == "ray":
        from .grid.ray_backend import RayBackend
        return RayBackend(grid.resources, address)
    if name == "ray-warm":
        from .grid.ray_warm import RayWarmBackend
        return RayWarmBackend(grid.resources, address, cell_timeout)
    if in_process:
        return InlineBackend()
    if name == "warm":
        return WarmBackend(plan, cell_timeout)
    return ProcessBackend(plan, cell_timeout)


def stored_runs(path: Path) -> tuple[dict, list[dict]]:
    """(config hash -> status, the successful rows) of the database at `path`, read-only; none when it does not exist
    or is empty (a 0-byte file is a new database here as in a real run, which creates the tables in it)."""
    from .store import Store
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return {}, []
    with Store(path, readonly=True) as store:
        return store.statuses(), store.rows(["success"])


def worker_plan(cells, rows: list[dict], workers: int | None, gpus, probes: dict | None = None,
                asked: str | None = None):
    """(the worker plan for `cells` on this machine, the memory one worker needs and where that figure came from)."""
    from .grid.backends import machine_plan
    from .grid.estimate import worker_need
    need = worker_need(cells, rows, probes, on_gpu=bool(gpus))
    return machine_plan(workers, need.bytes, gpus=gpus, asked=asked), need


def dry_run(grid, path: Path, backend_name: str, workers: int | None, use_gpu: bool | None, probe: bool,
            cell_timeout: float | None = None, asked: str | None = None) -> int:
    """List the cells and their status, and estimate the grid's time from stored timings of similar cells and, with
    `probe`, from one real cell of each kind not yet timed (probe.py; a probe past `cell_timeout` is stopped). The
    database is only read."""
    from .grid.estimate import estimate_grid
    status, rows = stored_runs(path)
    todo = [c for c in grid.cells if status.get(c.key) != "success"]
    plan = need = None
    if use_gpu is not None:  # a --workers the machine cannot hold is refused before anything is probed
        from .grid.backends import visible_gpus
        plan, need = worker_plan(todo or grid.cells, rows, workers, visible_gpus(use_gpu), asked=asked)
    for cell in grid.cells:
        print(f"{cell.key}  {status.get(cell.key, 'new'):9s}  {cell.describe()}")
    once = [c for c in grid.cells if c.seed_free]
    print(f"grid {grid.name} ({grid.source}): {len(grid.cells)} cells, {len(todo)} to run, database {path}"
          + (f"; seed-free, run once for every seed: {', '.join(f'{c.label} ({c.config.shots} shots)' for c in once)}"
             if once and len(grid.seeds) > 1 else ""))
    sys.stdout.flush()
    probes = {}
    if probe and todo:  # stdout stays the list of cells, one per line: the probe's lines go to stderr as the estimate's
        from .grid import Interrupted, signals_raise
        from .grid.probe import run_probes
        try:
            with signals_raise():  # SIGTERM too stops the probe's process and removes its folder
                probes = run_probes(todo, rows, out=sys.stderr, cell_timeout_s=cell_timeout)
        except Interrupted as e:
            print(f"fewtune: dry run interrupted ({e}); nothing was written", file=sys.stderr)
            return 128 + e.signum
        if use_gpu is not None and any(p.device.startswith("cuda") for p in probes.values()):
            from .grid.backends import visible_gpus  # a probe measured a peak on the GPU: the plan follows it
            plan, need = worker_plan(todo, rows, workers, visible_gpus(use_gpu), probes, asked=asked)
    for line in estimate_grid(todo, rows, backend_name, plan.workers if plan else None, probes):
        print(line, file=sys.stderr)
    if plan is not None:
        where = (f"on GPU{'s' if len(set(plan.devices)) > 1 else ''} {','.join(map(str, plan.devices))}"
                 if any(d is not None for d in plan.devices) else "on the CPU")
        print(f"  worker plan: {plan.workers} worker(s) {where}; per worker: {need.says}", file=sys.stderr)
    return 0


def cmd_results(args) -> int:
    from .report.data import flat_row
    from .store import Store
    statuses = None
    if args.status:
        statuses = [s.strip() for s in args.status.split(",") if s.strip()]
        for s in statuses:
            if s not in STATUSES:
                raise FewtuneError(f"--status {s}: unknown status; use {', '.join(STATUSES)}.")
    if args.predictions:
        args.format = args.format or "jsonl"
        if args.format not in ("jsonl", "csv", "parquet"):
            raise FewtuneError(f"--predictions exports jsonl, csv or parquet, not --format {args.format}.")
    else:
        args.format = args.format or "table"
        if args.format == "jsonl":
            raise FewtuneError("--format jsonl is for --predictions; runs export as table, csv, json or parquet.")
    if args.findings is not None and (args.predictions or args.format != "json"):
        raise FewtuneError("--findings goes with --format json (it adds a findings block to the runs).")
    findings = None
    if args.findings is not None:
        from .findings import resolve
        findings, _ = resolve(args.findings)
    if args.format == "parquet" and not args.output:
        raise FewtuneError("--format parquet needs --output FILE (parquet is binary).")
    out = None
    if args.output:
        from .util import check_writable
        out = check_writable(args.output, "--output")
    if args.predictions:
        return export_predictions(db_path(args), statuses, args.format, out)
    with Store(db_path(args), readonly=True) as store:
        rows = store.rows(statuses)
    if args.format == "json":
        from .store import json_default
        doc = rows
        if findings is not None:  # an object only when asked for: scripts reading the list keep working
            doc = {"runs": rows, "findings": findings_block(findings, rows, store_path=db_path(args))}
        text = json.dumps(doc, indent=2, default=json_default) + "\n"
    elif args.format == "csv":
        import csv
        import io
        flat = [flat_row(r) for r in rows]
        buf = io.StringIO()
        # every column any row has (icl rows add demonstrations_dropped), in the order they first appear
        fields = list(dict.fromkeys(k for f in flat for k in f)) or ["config_hash"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        text = buf.getvalue()
    elif args.format == "parquet":
        try:
            import pandas as pd
            import pyarrow  # noqa: F401
        except ImportError:
            raise FewtuneError("--format parquet needs pandas and pyarrow: pip install pandas pyarrow.") from None
        pd.DataFrame([flat_row(r) for r in rows]).to_parquet(out, index=False)
        print(f"{len(rows)} runs written to {out}")
        return 0
    else:
        text = results_table([flat_row(r) for r in rows])
    if out:
        out.write_text(text, encoding="utf-8")
        print(f"{len(rows)} runs written to {out}")
    else:
        sys.stdout.write(text)
    return 0


def findings_block(findings, rows: list[dict], store_path) -> dict:
    """The findings file's verdicts on the runs, as the report's first section has them (JSON-ready)."""
    from .findings.judge import judge
    from .stats.options import flat_row, group_runs, predictions_reader
    from .store import Store
    from .stats.claims import attach_plans
    with Store(store_path, readonly=True) as store:
        flat = [flat_row(r) for r in rows]
        groups = group_runs(flat, rows, predictions_reader(store))
        attach_plans(groups, flat, store.seed_plans())
    return judge(findings, groups).to_dict()


def prediction_rows(row: dict, preds: dict):
    """One dict per evaluation example of one run: the run's identity columns, the example and its scores."""
    result = row.get("result") or {}
    labels = list((result.get("task") or {}).get("labels") or [])
    evals = row.get("metrics") or {}
    for split, p in preds.items():
        names = labels if len(labels) == p["logprobs"].shape[1] else [str(k) for k in range(p["logprobs"].shape[1])]
        role = (evals.get(split) or {}).get("role")
        groups = p.get("groups") or [None] * len(p["idx"])
        for i in range(len(p["idx"])):
            gold, pred = int(p["gold"][i]), int(p["pred"][i])
            d = {"config_hash": row["config_hash"], "label": row.get("label"), "method": row.get("method"),
                 "model": row.get("model"), "task": row.get("task"), "shots": row.get("shots"), "seed": row.get("seed"),
                 "split": split, "role": role, "idx": int(p["idx"][i]), "gold": gold, "gold_label": names[gold],
                 "pred": pred, "pred_label": names[pred], "correct": gold == pred}
            for k, name in enumerate(names):
                d[f"logprob_{name}"] = float(p["logprobs"][i, k])
            for key, value in (groups[i] or {}).items():
                d[key] = value
            yield d


def export_predictions(path, statuses, fmt: str, out) -> int:
    """`fewtune results --predictions`: every stored per-example prediction, one row per run x example."""
    import csv
    import io

    from .store import Store
    with Store(path, readonly=True) as store:
        rows = [r for r in store.rows(statuses) if r["status"] == "success"]
        preds = {r["config_hash"]: store.predictions(r["config_hash"]) for r in rows}
    if not rows:
        raise FewtuneError(f"{path}: no successful runs, so no predictions to export.")
    missing = [r["config_hash"] for r in rows if not preds[r["config_hash"]]]
    if len(missing) == len(rows):
        raise FewtuneError(f"{path}: none of its {len(rows)} successful runs has per-example predictions (they were "
                           "recorded before fewtune stored them); rerun them to get predictions.")
    if missing:
        print(f"fewtune: {len(missing)} of {len(rows)} runs have no per-example predictions (recorded before fewtune "
              f"stored them; rerun them): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    records = (d for r in rows for d in prediction_rows(r, preds[r["config_hash"]]))
    n = 0
    if fmt == "parquet":
        try:
            import pandas as pd
        except ImportError:
            raise FewtuneError("--format parquet needs pandas and pyarrow: pip install pandas pyarrow.") from None
        frame = pd.DataFrame(list(records))
        n = len(frame)
        frame.to_parquet(out, index=False)
    else:
        stream = open(out, "w", encoding="utf-8", newline="") if out else sys.stdout
        try:
            if fmt == "jsonl":
                for d in records:
                    stream.write(json.dumps(d) + "\n")
                    n += 1
            else:  # csv: the columns of all rows (label names and group keys differ between tasks)
                items = list(records)
                fields = list(dict.fromkeys(k for d in items for k in d))
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
                writer.writeheader()
                writer.writerows(items)
                stream.write(buf.getvalue())
                n = len(items)
        finally:
            if out:
                stream.close()
    if out:
        print(f"{n} predictions of {len(rows) - len(missing)} runs written to {out}")
    return 0


def results_table(flat: list[dict]) -> str:
    from .report.data import mib, pct, seconds

    def cell(key, value):
        if key in ("id_accuracy", "ood_accuracy"):
            return pct(value, 2)
        if key in ("id_primary", "ood_primary") and value is not None:
            return f"{value:.4f}"
        if key == "train_seconds":
            return seconds(value)
        if key == "peak_memory_mib":
            return mib(value)
        if value is None:
            return ""
        return str(value)[:60]
    rows = [[cell(k, f[k]) for k in RESULT_COLUMNS] for f in flat]
    headers = ["hash", "status", "method", "task", "model", "shots", "seed", "metric", "ID", "OOD", "ID acc %",
               "OOD acc %", "train s", "peak MiB", "error"]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"({len(rows)} runs)")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> int:
    from .report import write_report
    from .util import check_writable
    out = Path(args.out) if args.out else db_path(args).parent / "report"
    if out.exists() and not out.is_dir():
        raise FewtuneError(f"--out {out} is a file; give a folder.")
    if not out.exists():
        check_writable(str(out), "--out")
    for flag in ("predictions_per_day", "days", "max_latency_ms"):
        value = getattr(args, flag)
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise FewtuneError(f"--{flag.replace('_', '-')} must be a positive number, got {value:g}.")
    volume = args.predictions_per_day * args.days if args.predictions_per_day else None
    from .findings import resolve
    findings, default = resolve(args.findings or "auto")  # a bad findings file is refused before the database is read
    if args.max_retention_loss is not None and not (math.isfinite(args.max_retention_loss)
                                                    and args.max_retention_loss >= 0):
        # a negative limit would leave out every option whose loss did not fall: it cannot mean anything
        raise FewtuneError(f"--max-retention-loss must be a number ≥ 0 (nats/token the LM loss may rise), got "
                           f"{args.max_retention_loss:g}.")
    if args.equivalence_margin is not None and not (math.isfinite(args.equivalence_margin)
                                                    and 0 < args.equivalence_margin <= 2):
        raise FewtuneError(f"--equivalence-margin must be > 0 and at most the metric's range (1 for accuracy, 2 for "
                           f"MCC), got {args.equivalence_margin:g}.")
    made = not out.exists()
    try:
        paths = write_report(db_path(args), out, volume=volume, max_latency_ms=args.max_latency_ms,
                             max_retention_loss=args.max_retention_loss, margin=args.equivalence_margin,
                             findings="auto" if default else (findings or "none"))
    except BaseException:
        if made:  # refused (or stopped) before the report was whole: the folder this command made goes with it
            import shutil
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"report written to {paths['markdown']} and {paths['html']} (figures in {paths['figures']})")
    return 0


COMMANDS = {"grid": cmd_grid, "results": cmd_results, "report": cmd_report}

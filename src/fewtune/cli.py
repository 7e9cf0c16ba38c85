"""The `fewtune` command. `main(argv) -> int` so tests call the CLI as a function.

Errors caused by the user's input print one line (`fewtune: error: ...`) and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from pathlib import Path

from .errors import FewtuneError
from .methods import REGISTRY, option_flags
from .util import check_writable, json_default, read_text_file, write_atomic  # check_writable: cli_grid's too

RUN_FIELDS = ("task", "method", "model", "shots", "seed", "train_seed", "pattern", "eval_limit", "data_root",
              "data_source", "epochs", "batch_size", "micro_batch_size", "lr", "weight_decay", "warmup_ratio",
              "max_length", "eval_batch_size", "dtype", "device", "preset", "retention")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage first)
        raise FewtuneError(f"{self.prog}: {message}")


def build_parser(method_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line. `method_flags`: add `run`'s per-method flags, which import every method (and so
    torch); main() asks for them only when the command is `run`."""
    p = Parser(prog="fewtune", description="Compare few-shot adaptation methods, in-domain and out-of-domain, with their costs.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", parser_class=Parser)

    r = sub.add_parser("run", help="run one method on one task and write a result record")
    r.add_argument("--config", help="TOML file with run fields (flags override it)")
    r.add_argument("--task", help="built-in task (cola, mnli) or path to a task file [mnli]")
    r.add_argument("--method", help=f"{', '.join(REGISTRY)} [icl]")
    r.add_argument("--model", help="bundled name (smollm2-135m), local folder or Hub id [smollm2-135m]")
    r.add_argument("--shots", type=int, help="few-shot training examples in total, all classes together (icl: demonstrations) [16]")
    r.add_argument("--shots-per-class", type=int, metavar="K",
                   help="K examples per class instead: recorded as --shots K x (number of labels), the same run")
    r.add_argument("--seed", type=int, help="data seed: which examples, in which order [0]")
    r.add_argument("--train-seed", type=int, help="initialisation and shuffling seed [= --seed]")
    r.add_argument("--pattern", type=int, help="index of the task's pattern [0]")
    r.add_argument("--uniform", action="store_true", help="sample uniformly instead of class-balanced")
    r.add_argument("--eval-limit", type=int, help="stratified subsample per evaluation split [all]")
    r.add_argument("--eval-splits", help="comma-separated evaluation splits [the task's in-domain + OOD]")
    r.add_argument("--data-root", help="folder laid out like shared/data [$FEWTUNE_DATA or ../shared/data]")
    r.add_argument("--data-source", choices=None, help="auto | local | hub [auto]")
    r.add_argument("--preset", help="quick: small CPU budget for every method")
    for flag, kind in (("epochs", int), ("batch-size", int), ("micro-batch-size", int), ("lr", float),
                       ("weight-decay", float), ("warmup-ratio", float), ("max-length", int), ("eval-batch-size", int)):
        r.add_argument(f"--{flag}", type=kind)
    r.add_argument("--retention-text", dest="retention", metavar="FILE|off",
                   help="LM loss before/after adaptation on this text (one sentence a line), or off "
                        "[mnli-premises: 500 MNLI dev_matched premises]")
    r.add_argument("--dtype", help="auto | fp32 | bf16 (autocast; never fp16 on CPU) [auto]")
    r.add_argument("--device", help="auto | cpu | cuda [auto]")
    g = r.add_argument_group("method options")  # each declared by the method's own Options (methods/base.option)
    for entry in (option_flags() if method_flags else {}).values():
        if entry.flag.key_value:
            g.add_argument(entry.flag.flag, dest=entry.dest, action="append", metavar="KEY=VALUE", help=entry.help)
        else:
            g.add_argument(entry.flag.flag, dest=entry.dest, type=entry.flag.kind, help=entry.help)
    r.add_argument("--output", "-o", help="write the result record (JSON) here")
    r.add_argument("--save-model", help="save the trained model/adapter with its pattern and verbalizer here")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    r.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own Python code to run")
    r.add_argument("--allow-unsafe-weights", action="store_true", help="allow pickled (.bin) weights, not only safetensors")

    ls = sub.add_parser("ls", help="list tasks, methods or models")
    ls.add_argument("what", choices=["tasks", "methods", "models"])
    ls.add_argument("--dir", help="tasks: also list the task files in this folder [the current folder]")

    ck = sub.add_parser("check", help="load and validate a task file (data, columns, label words, sizes) or a "
                                      "findings file; runs nothing")
    ck.add_argument("task", help="path to a task file (or a built-in task name), or to a findings file (or: study)")
    ck.add_argument("--spec", help="findings file: check its labels against this grid spec (file or shipped name)")
    ck.add_argument("--model", default=None, help="check the label words against this model's tokenizer [smollm2-135m]")
    ck.add_argument("--data-root", help="folder the task's local paths are relative to [$FEWTUNE_DATA or ../shared/data]")
    ck.add_argument("--data-source", default="auto", help="auto | local | hub [auto]")
    ck.add_argument("--trust-remote-code", action="store_true", help="allow the model's own tokenizer code to run")

    pr = sub.add_parser("predict", help="use a model saved with --save-model on new text")
    pr.add_argument("--model-dir", required=True)
    pr.add_argument("--input", required=True, help="JSONL (one object with the task's fields per line), or plain text "
                                                  "(one example per line, single-field tasks only)")
    pr.add_argument("--output", "-o", help="write predictions (JSONL) here [stdout]")
    pr.add_argument("--device", default="auto")

    for extension in EXTENSIONS:
        extension.add_parser(sub)
    return p


EXTENSIONS = []  # modules with add_parser(subparsers) and COMMANDS = {name: handler}; see cli_grid.py


def config_from_args(args) -> "RunConfig":
    from .config import RunConfig
    fields = {}
    if args.config:
        path = Path(args.config)
        try:
            fields = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is not TOML
        except FileNotFoundError:
            raise FewtuneError(f"Config file {path} does not exist.") from None
        except UnicodeDecodeError as e:
            raise FewtuneError(f"Config file {path} is not UTF-8 text (bad byte at offset {e.start}).") from None
        except tomllib.TOMLDecodeError as e:
            raise FewtuneError(f"Config file {path} is not valid TOML: {e}.") from None
        except OSError as e:  # a folder, no permission
            raise FewtuneError(f"Config file {path} cannot be read: {e.strerror or e}.") from None
    file_per_class = fields.pop("shots_per_class", None)
    if file_per_class is not None and "shots" in fields:
        raise FewtuneError(f"{args.config}: shots and shots_per_class both given: shots is the total over all classes; give one of them.")
    for name in RUN_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    # --shots-per-class K (or shots_per_class in the config file) becomes shots = K x labels: the same run as that total
    if args.shots is not None and args.shots_per_class is not None:
        raise FewtuneError("--shots and --shots-per-class both given: --shots is the total over all classes; give one of them.")
    if args.shots_per_class is not None:
        fields["shots"] = shots_for_per_class(args.shots_per_class, fields, "--shots-per-class")
    elif file_per_class is not None and args.shots is None:
        fields["shots"] = shots_for_per_class(file_per_class, fields, f"{args.config}: shots_per_class")
    if args.uniform:
        fields["balanced"] = False
    if args.eval_splits:
        fields["eval_splits"] = [s.strip() for s in args.eval_splits.split(",") if s.strip()]
    if args.trust_remote_code:
        fields["trust_remote_code"] = True
    if args.allow_unsafe_weights:
        fields["allow_unsafe_weights"] = True
    method = fields.get("method", "icl")
    options = dict(fields.get("method_options", {}))
    for entry in option_flags().values():
        options.update(flag_options(entry, getattr(args, entry.dest, None), method))
    fields["method_options"] = options
    return RunConfig.from_dict(fields, where=str(args.config or "flags"))


def flag_options(entry, value, method: str) -> dict:
    """The method options a method flag's value sets: {option: value}, or {KEY: VALUE, ...} for a KEY=VALUE flag."""
    if value is None or value == []:
        return {}
    flag, methods = entry.flag, entry.fields
    if method not in methods:
        if flag.key_value:
            raise FewtuneError(f"{flag.flag} applies to method {', '.join(methods)}, not '{method}'.")
        raise FewtuneError(f"{flag.flag} applies to method(s) {', '.join(methods)}, not '{method}'.")
    if flag.key_value:
        return dict(parse_option(item, flag.flag) for item in value)
    if flag.split:
        value = [v.strip() for v in value.split(flag.split) if v.strip()]
    return {methods[method]: value}


def shots_for_per_class(k, fields: dict, what: str) -> int:
    """The total that K examples per class implies for the task in `fields` (LM-BFF's "16 per class")."""
    from .tasks import load_task
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise FewtuneError(f"{what} must be an integer ≥ 0, got {k!r:.60}.")
    task = fields.get("task", "mnli")
    if not isinstance(task, str):
        raise FewtuneError(f"Config field 'task' must be a string, got {task!r:.60}.")
    return k * len(load_task(task).labels)


def parse_option(item: str, flag: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE a TOML value (number, bool, string, list, inline table); anything else is a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise FewtuneError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} r=8 or {flag} 'target_modules=[\"q_proj\"]'.")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def cmd_run(args) -> int:
    from .methods import get_method
    from .runner import run, summary_line
    cfg = config_from_args(args)
    get_method(cfg.method, cfg.method_options)  # validate options before any loading
    out = check_writable(args.output, "--output") if args.output else None
    if args.save_model:
        from .saving import check_save_folder
        target = Path(args.save_model)
        check_save_folder(target)  # a folder of the user's own files is never written into
        # an existing folder must be writable itself; a new one needs a writable parent
        check_writable(str(target / "fewtune.json") if target.is_dir() else str(target), "--save-model")
    result = run(cfg, progress=not args.quiet and sys.stderr.isatty(), save_model=args.save_model)
    if out:
        write_atomic(out, json.dumps(result, indent=2, default=json_default))
    print(summary_line(result))
    if out:
        print(f"result written to {out}")
    return 0


def cmd_ls(args) -> int:
    if args.dir and args.what != "tasks":
        raise FewtuneError(f"--dir lists task files: it goes with `fewtune ls tasks`, not `ls {args.what}`.")
    if args.what == "tasks":
        from .tasks import builtin_names, load_task
        for name in builtin_names():
            t = load_task(name)
            print(f"{name:10s} v{t.version}  {t.description}  [train={t.train}; in-domain={t.in_domain}; ood={','.join(t.out_of_domain)}]")
        folder = Path(args.dir) if args.dir else Path(".")
        if args.dir and not folder.is_dir():
            raise FewtuneError(f"--dir {folder} is not a folder.")
        for path, t, error in task_files(folder):
            if t is not None:
                print(f"{str(path):10s} v{t.version}  '{t.name}': {t.description}  [train={t.train}; in-domain={t.in_domain}; "
                      f"ood={','.join(t.out_of_domain) or '-'}]")
            else:
                print(f"{str(path):10s} (not valid: {error})")
        print(f"(your own task: --task path/to/task.toml, see docs/tasks.md; task files listed from {folder.resolve()})")
    elif args.what == "methods":
        for name, cls in REGISTRY.items():
            doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:9s} {doc}")
            for line in cls.listing():
                print(f"{'':9s} {line}")
    else:
        from .engine.models import list_models
        for m in list_models():
            licence = f" [licence: {m['licence']}]" if m.get("licence") else ""
            print(f"{m['name']:14s} {m['status']:34s} {m['description']}{licence}")
        print("(also: any Hugging Face causal LM by Hub id, e.g. facebook/opt-125m, or a local model folder)")
    return 0


def task_files(folder: Path):
    """(path, Task or None, error) for each *.toml in `folder` that is a task file: one that parses as a task, or
    one with task keys (patterns, splits) that does not (grid specs, configs and pyproject.toml are left out)."""
    from .tasks import parse_task_file
    out = []
    for path in sorted(folder.glob("*.toml")):
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if not isinstance(raw.get("patterns"), list) and not isinstance(raw.get("splits"), dict):
            continue
        try:
            out.append((path, parse_task_file(path), None))
        except FewtuneError as e:
            out.append((path, None, str(e)))
    return out


def cmd_check(args) -> int:
    """Validate a task file end to end without loading a model or running anything (or a findings file)."""
    from collections import Counter

    if args.spec is not None or is_findings_file(args.task):
        return check_findings(args.task, args.spec)

    from .data import load_split
    from .engine import models
    from .tasks import load_task
    task = load_task(args.task)
    model = args.model or models.DEFAULT_MODEL
    print(f"task '{task.name}' v{task.version} ({task.source}): {len(task.labels)} labels {list(task.labels)}, "
          f"fields {list(task.fields)}, {len(task.patterns)} pattern(s), metrics {', '.join(task.metrics)}")
    roles = {task.train: "train", task.in_domain: "in-domain", **{s: "out-of-domain" for s in task.out_of_domain}}
    loaded = {}
    width = max(len(n) for n in task.splits)
    for name in task.splits:
        examples = loaded[name] = load_split(task, name, args.data_root, args.data_source)
        counts = Counter(ex.label for ex in examples)
        per_label = ", ".join(f"{label} {counts.get(i, 0)}" for i, label in enumerate(task.labels))
        groups = f"; groups {', '.join(task.splits[name].group_by)}" if task.splits[name].group_by else ""
        print(f"  split {name:{width}s}  {roles.get(name, 'unused'):13s} {len(examples):7d} examples ({per_label}){groups}")
    train = loaded[task.train]
    missing = [task.labels[i] for i in range(len(task.labels)) if not any(ex.label == i for ex in train)]
    if missing:
        raise FewtuneError(f"{task.source}: the train split '{task.train}' has no example of label(s) {missing}; "
                           f"no balanced sample can be drawn.")
    smallest = min(Counter(ex.label for ex in train).values())
    print(f"  balanced samples up to {smallest} per class (--shots-per-class {smallest}, --shots {smallest * len(task.labels)})")
    tokenizer = models.load_tokenizer(model, args.trust_remote_code)
    for i, pattern in enumerate(task.patterns):
        prompts = []
        for ex in train[:4] + loaded[task.in_domain][:4]:
            try:
                prompts.append(task.format(pattern, ex))
            except (ValueError, KeyError, IndexError, AttributeError) as e:
                raise FewtuneError(f"{task.source} patterns[{i}]: the template cannot format split '{task.train}' row "
                                   f"{ex.idx}: {type(e).__name__}: {e}.") from None
        ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer, model, prompts)
        words = ", ".join(f"{w!r}→{tokenizer.convert_ids_to_tokens([t])[0]!r}" for w, t in zip(pattern.verbalizer, ids))
        print(f"  pattern {i}: label words one token each and as the model reads them after the prompt, for {model}: {words}")
    print(f"ok: {task.source} is a valid task")
    return 0


def is_findings_file(name: str) -> bool:
    """A shipped findings name, or a readable TOML file with a [[claims]] list (task files have none)."""
    from .findings import SHIPPED, is_findings
    if name in SHIPPED:
        return True
    p = Path(name)
    if not p.is_file():
        return False
    try:
        return is_findings(tomllib.loads(p.read_text(encoding="utf-8-sig")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
        return False  # the task file checks say what is wrong with it


def check_findings(name: str, spec: str | None) -> int:
    """`fewtune check FINDINGS [--spec SPEC]`: the file's format, margins and, with a spec, its labels."""
    from .findings import check_against_labels, load_findings
    findings = load_findings(name)
    print(f"findings {findings.source}: {len(findings.claims)} claim(s): "
          + ", ".join(f"{c.id} ({c.relation}, {c.split})" for c in findings.claims))
    if spec is not None:
        from .grid import load_grid
        grid = load_grid(spec)
        labels = sorted({cell.label for cell in grid.cells} | set(grid.opt_in_labels))  # opt-in lists' labels too
        check_against_labels(findings, labels, f"grid {grid.name} ({grid.source})")
        check_margins_against_tasks(findings, grid)
        print(f"  every label and glob names an option of grid {grid.name}: {', '.join(labels)}")
    print(f"ok: {findings.source} is a valid findings file")
    return 0


def check_margins_against_tasks(findings, grid) -> None:
    """Each claim's margin against the primary metric of every task of the grid it applies to, as the report will
    judge it (a margin of 1.5 is possible for MCC, not for accuracy)."""
    from .grid.grid_spec import task_name
    from .tasks import check_margin, load_task
    tasks = {task_name(c.config.task): c.config.task for c in grid.cells}
    for claim in findings.claims:
        if claim.margin is None:
            continue
        for name, task in tasks.items():
            if claim.tasks is None or name in claim.tasks:
                metric = load_task(task).primary_metric
                check_margin(claim.margin, metric, f"{findings.source}: claim '{claim.id}': margin on task '{name}' "
                                                   f"(scored by {metric})")


def read_predict_input(path: str, fields: list[str]) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        raise FewtuneError(f"--input {p} is a folder; give a file.")
    if not p.is_file():
        raise FewtuneError(f"--input {p} does not exist.")
    lines = read_text_file(p, "--input").splitlines()  # a byte-order mark (Excel, Notepad) is not an example
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FewtuneError(f"{p} line {n}: not valid JSON ({e.msg}).") from None
        elif len(fields) == 1:
            row = {fields[0]: line}
        else:
            raise FewtuneError(f"{p} line {n}: this task has fields {fields}; give JSON objects, one per line.")
        rows.append(row)
    if not rows:
        raise FewtuneError(f"--input {p} holds no examples.")
    return rows


def cmd_predict(args) -> int:
    from .saving import MANIFEST, check_format, predict
    manifest_path = Path(args.model_dir) / MANIFEST
    if not manifest_path.exists():
        raise FewtuneError(f"{args.model_dir} is not a fewtune model folder (no {MANIFEST}).")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        check_format(manifest, manifest_path)
        fields = manifest["task"]["fields"]
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FewtuneError(f"{manifest_path} is not valid JSON with task.fields ({type(e).__name__}: {e}); "
                           "save the model again with --save-model.") from None
    rows = read_predict_input(args.input, fields)
    out = check_writable(args.output, "--output") if args.output else None
    preds = predict(args.model_dir, rows, args.device)
    text = "\n".join(json.dumps({**row, **pred}) for row, pred in zip(rows, preds)) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = {"run": cmd_run, "ls": cmd_ls, "predict": cmd_predict, "check": cmd_check}

from . import cli_grid; EXTENSIONS.append(cli_grid)  # noqa: E402,E702  grid, results, report


# Commands that load no model: they import neither transformers nor torch (tests/test_cli.py checks it)
READ_ONLY_COMMANDS = ("report", "results", "ls")


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv (its first word that is not an option), without parsing the rest."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "huggingface_hub", "datasets", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    if command not in READ_ONLY_COMMANDS:
        try:  # transformers' per-load progress bars are noise next to fewtune's own (importing it takes ~2 s)
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        parser = build_parser(method_flags=command == "run")
        args = parser.parse_args(argv)
        if args.verbose:
            logging.getLogger("fewtune").setLevel(logging.INFO)
        if not args.command:
            parser.print_help()
            return 2
        handlers = dict(COMMANDS)
        for extension in EXTENSIONS:
            handlers.update(extension.COMMANDS)
        return handlers[args.command](args)
    except FewtuneError as e:
        print(f"fewtune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fewtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

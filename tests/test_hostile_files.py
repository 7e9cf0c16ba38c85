"""Hostile and unusual files and folders: data, task, config and predict-input files (byte-order marks, contents
never echoed in errors), --save-model and --model-dir folders, read-only, empty and damaged results databases,
figure file names, and docs that agree with the code. Each bad input is one line and exit 2 through
`fewtune.cli.main`, with nothing lost; the inputs marked as acceptable are accepted. The fixtures and the
checks are test_hostile.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from fewtune.cli import main
from fewtune.store import Store
from test_hostile import GRID_SPEC, Env, assert_one_line_error, env, results_db, snapshot  # noqa: F401 (fixtures)

MANIFEST = {"format": 1, "method": "pbft", "objective": "lm", "adapter": False, "base_model": None,
            "task": {"name": "toy", "version": 1, "labels": ["negative", "positive"], "fields": ["text"],
                     "raw_separator": "\n", "pattern": "{text}\nQuestion: Is this review positive? Answer:",
                     "verbalizer": [" No", " Yes"]},
            "max_length": 64, "config": {}, "config_hash": "0" * 16, "evals": {}}


def saved(env: Env, name: str = "saved", **manifest) -> Path:
    """A folder as `--save-model` writes it for a full model: the tiny model, its tokenizer, fewtune.json."""
    folder = env.root / name
    shutil.copytree(env.model, folder)
    (folder / "fewtune.json").write_text(json.dumps({**MANIFEST, **manifest}))
    return folder


def predict(env: Env, folder: Path, *extra: str) -> list[str]:
    rows = env.write("in.jsonl", '{"text": "A fine film."}\n')
    return ["predict", "--model-dir", str(folder), "--input", str(rows), "--device", "cpu", *extra]


def without_weights(env: Env) -> Path:
    folder = saved(env)
    (folder / "model.safetensors").unlink()
    return folder


def truncated_weights(env: Env) -> Path:
    folder = saved(env)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def without_tokenizer(env: Env) -> Path:
    folder = saved(env)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    return folder


def damaged_tokenizer(env: Env) -> Path:
    folder = saved(env)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return folder


def folder(env: Env, name: str) -> Path:
    (env.root / name).mkdir()
    return env.root / name


def spec(env: Env, text: str, *extra: str) -> list[str]:
    return [*env.grid(text), *extra]


def many_seeds(n: int) -> str:
    return GRID_SPEC.replace("seeds = [0]", f"seeds = {list(range(n))}")


def climbing_grid(e: Env) -> str:
    """A grid over a task whose dev split's relative path climbs out of the data root."""
    task = e.task_with('path = "toy/dev.tsv"', 'path = "../../../../etc/passwd"')
    return f'data_root = "{e.data}"\n' + GRID_SPEC.replace('["cola"]', f'["{task}"]')


# id, builds the input -> argv, fragments the one-line error must hold
CASES = [
    # 19: tracebacks
    ("run-eval-batch-size-0", lambda e: e.run("--eval-batch-size", "0"), ["'eval_batch_size' must be ≥ 1"]),
    ("run-output-is-a-folder", lambda e: e.run("-o", str(folder(e, "out"))), ["--output", "out is a folder"]),
    ("task-template-format-spec", lambda e: e.run(task=e.task_with("{text}\\n", "{text:d}\\n")),
     ["bad-task.toml patterns[0]", "{text:d}", "plain fields only", "{text}"]),
    ("task-template-conversion", lambda e: e.run(task=e.task_with("{text}\\n", "{text!r}\\n")),
     ["bad-task.toml patterns[0]", "{text!r}", "plain fields only"]),
    ("results-output-is-a-folder", lambda e: ["results", "--db", str(e.db), "-o", str(folder(e, "export"))],
     ["--output", "export is a folder"]),
    ("predict-weights-missing", lambda e: predict(e, without_weights(e)), ["saved", "model.safetensors", "missing"]),
    ("predict-weights-truncated", lambda e: predict(e, truncated_weights(e)),
     ["model.safetensors is damaged or truncated"]),
    ("predict-tokenizer-missing", lambda e: predict(e, without_tokenizer(e)), ["saved", "tokenizer", "missing"]),
    ("predict-tokenizer-damaged", lambda e: predict(e, damaged_tokenizer(e)), ["saved tokenizer cannot be read"]),
    # 20: silently wrong
    ("run-save-model-into-a-users-folder", lambda e: e.run("--save-model", str(e.write("mine/README.md", "# mine").parent)),
     ["--save-model", "mine", "other files", "new or empty folder"]),
    ("grid-unknown-preset-dry-run", lambda e: spec(e, 'preset = "quik"\n' + GRID_SPEC, "--dry-run"),
     ["bad-grid.toml (icl)", "Unknown preset 'quik'", "Did you mean: quick"]),
    ("grid-eval-batch-size-0-dry-run", lambda e: spec(e, "eval_batch_size = 0\n" + GRID_SPEC, "--dry-run"),
     ["bad-grid.toml (icl)", "'eval_batch_size' must be ≥ 1"]),
    ("grid-pattern-missing-dry-run", lambda e: spec(e, "pattern = 9\n" + GRID_SPEC, "--dry-run"),
     ["bad-grid.toml (icl)", "--pattern 9 does not exist"]),
    ("grid-eval-split-missing-dry-run", lambda e: spec(e, 'eval_splits = ["tset"]\n' + GRID_SPEC, "--dry-run"),
     ["bad-grid.toml (icl)", "no split 'tset'"]),
    ("grid-too-many-cells", lambda e: spec(e, many_seeds(10_001), "--dry-run"),
     ["bad-grid.toml", "expands to 10,001 cells", "limit of 10,000", "--max-cells 10001"]),
    ("grid-more-cells-than-max-cells", lambda e: spec(e, many_seeds(3), "--dry-run", "--max-cells", "2"),
     ["expands to 3 cells", "limit of 2"]),
    ("grid-max-cells-zero", lambda e: spec(e, GRID_SPEC, "--dry-run", "--max-cells", "0"), ["--max-cells must be ≥ 1"]),
    ("run-lr-0", lambda e: e.run("--method", "pbft", "--lr", "0"), ["'lr' must be > 0", "pbft"]),
    ("grid-lr-0", lambda e: spec(e, "lr = 0.0\n" + GRID_SPEC.replace('"icl"', '"ft"'), "--dry-run"), ["'lr' must be > 0"]),
    ("predict-unknown-format", lambda e: predict(e, saved(e, format=2)), ["fewtune.json has format 2", "reads format 1"]),
    ("predict-no-format", lambda e: predict(e, saved(e, format=None)), ["fewtune.json has format None"]),
    ("grid-seeds-not-a-list", lambda e: e.grid(GRID_SPEC.replace("seeds = [0]", "seeds = 3")),
     ["bad-grid.toml", "'seeds' must be a list", "seeds = [0, 1, 2]", "seeds = [3]"]),
    # 21: unclear
    ("grid-duplicate-shots", lambda e: e.grid(GRID_SPEC.replace("shots = [2]", "shots = [2, 2]")),
     ["bad-grid.toml", "'shots' lists 2 twice"]),
    ("grid-duplicate-seeds", lambda e: e.grid(GRID_SPEC.replace("seeds = [0]", "seeds = [0, 0]")),
     ["bad-grid.toml", "'seeds' lists 0 twice"]),
    ("grid-duplicate-method-shots", lambda e: e.grid(GRID_SPEC + "shots = [4, 4]\n"),
     ["bad-grid.toml methods[0]", "'shots' lists 4 twice"]),
    ("grid-spec-is-a-folder", lambda e: ["grid", str(folder(e, "spec.toml")), "--db", str(e.db)],
     ["Grid spec", "spec.toml is a folder"]),
    ("grid-spec-is-a-folder-no-suffix", lambda e: ["grid", str(folder(e, "specs")), "--db", str(e.db)],
     ["Grid spec", "specs is a folder"]),
    ("predict-input-is-a-folder", lambda e: ["predict", "--model-dir", str(saved(e)), "--input", str(folder(e, "in"))],
     ["--input", "in is a folder"]),
    ("db-is-a-folder-dry-run", lambda e: ["grid", str(e.spec), "--dry-run", "--db", str(e.root)], ["is a folder"]),
    ("db-is-a-folder-results", lambda e: ["results", "--db", str(e.root)], ["is a folder"]),
    # 23: a relative data path stays inside the data root
    ("data-path-climbs-out", lambda e: e.run(task=e.task_with('path = "toy/dev.tsv"', 'path = "../../../../etc/passwd"')),
     ["Task 'toy' split 'dev'", "'../../../../etc/passwd' leaves the data root"]),
    ("data-path-climbs-out-grid", lambda e: spec(e, climbing_grid(e), "--dry-run"),
     ["bad-grid.toml (icl)", "leaves the data root"]),
    ("data-path-climbs-out-inside", lambda e: e.run(task=e.task_with('path = "toy/dev.tsv"', 'path = "toy/../../x.tsv"')),
     ["leaves the data root"]),
]


@pytest.mark.parametrize("make, fragments", [pytest.param(m, f, id=i) for i, m, f in CASES])
def test_bad_input_is_one_line_and_harmless(env, make, fragments, capsys):
    argv = make(env)
    before = snapshot(env.db)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert_one_line_error(code, err, fragments)
    assert snapshot(env.db) == before
    assert not list(env.root.rglob(".*.tmp-*")), "a temporary file was left behind"


def test_save_model_leaves_a_users_folder_alone(env, capsys):
    """--save-model into a folder of the user's own files is refused before the run and writes nothing there;
    a new folder, an empty one and an earlier fewtune save are accepted."""
    from fewtune.saving import check_save_folder
    mine = env.write("mine/README.md", "# my notes\n").parent
    assert main(env.run("--save-model", str(mine))) == 2
    assert [p.name for p in mine.iterdir()] == ["README.md"] and (mine / "README.md").read_text() == "# my notes\n"
    for ok in (env.root / "new", folder(env, "empty"), saved(env)):
        check_save_folder(ok)
    with pytest.raises(Exception, match="is a file"):
        check_save_folder(env.write("plain", "x"))


def saved_adapter(env: Env) -> Path:
    """A folder as `--save-model` writes it for a LoRA adapter over the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    folder = env.root / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(env.model), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(env.model / name, folder / name)
    (folder / "fewtune.json").write_text(json.dumps({**MANIFEST, "method": "lora", "adapter": True,
                                                     "base_model": str(env.model)}))
    return folder


def test_predict_never_goes_to_the_hub_for_a_model_dir(env, monkeypatch, capsys):
    """A saved adapter folder whose weights are missing is an error about that folder: peft would take the
    folder's path for a Hub repository id and look it up."""
    import huggingface_hub
    import peft.utils.save_and_load

    def no_network(*args, **kwargs):
        raise AssertionError("predict went to the Hub for a --model-dir")
    for module in (huggingface_hub, huggingface_hub.file_download, peft.utils.save_and_load):
        for name in ("hf_hub_download", "file_exists"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_network)
    folder = saved_adapter(env)
    assert main(predict(env, folder)) == 0  # whole, it works
    capsys.readouterr()
    (folder / "adapter_model.safetensors").unlink()
    code = main(predict(env, folder))
    assert_one_line_error(code, capsys.readouterr().err, ["adapter", "adapter_model.safetensors", "missing"])


def test_grid_dry_run_checks_every_cell_and_max_cells_raises_the_limit(env, capsys):
    """Within the limit (or above it with --max-cells) the cells are listed; only the over-limit spec is refused."""
    assert main(spec(env, many_seeds(3), "--dry-run", "--max-cells", "3")) == 0
    assert ": 3 cells, " in capsys.readouterr().out


# ----------------------------------------------------------------------------- 22: accepted
def test_byte_order_mark_in_a_data_file_is_accepted(env, capsys):
    """An Excel "CSV UTF-8" export starts with a byte-order mark; it is not part of the first column's name."""
    text = (env.data / "toy" / "train.tsv").read_text(encoding="utf-8")
    data = env.data_copy("train", "\ufeff" + text)
    assert main(env.run(data=data)) == 0, capsys.readouterr().err
    with_bom = capsys.readouterr().out
    assert main(env.run()) == 0
    assert with_bom.split(" | ")[0] == capsys.readouterr().out.split(" | ")[0]  # the same accuracies


def test_byte_order_mark_in_a_task_spec_or_config_file_is_accepted(env, capsys, tmp_path):
    """Notepad saves TOML with a byte-order mark: the task file, grid spec and run config still load, and the task
    is the same task (the same identity) as without it."""
    from fewtune.config import RunConfig
    bom_task = env.write("bom-task.toml", "\ufeff" + env.task.read_text(encoding="utf-8"))
    assert main(["check", str(bom_task), "--data-root", str(env.data)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    same = dict(data_root=str(env.data), method="icl", shots=2)
    assert RunConfig(task=str(bom_task), **same).hash() == RunConfig(task=str(env.task), **same).hash()
    spec_path = env.write("bom-grid.toml", "\ufeff" + GRID_SPEC)
    assert main(["grid", str(spec_path), "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    config = env.write("bom-run.toml", f'\ufefftask = "{env.task}"\ndata_root = "{env.data}"\nmethod = "icl"\n')
    args = env.run("-q", "-o", str(tmp_path / "r.json"))
    assert main(["run", "--config", str(config), *args[1:]]) == 0, capsys.readouterr().err


def test_byte_order_mark_in_predict_input_is_accepted(env, capsys):
    folder = saved(env)
    plain = env.write("plain.jsonl", '{"text": "A fine film."}\n')
    bom = env.write("bom.jsonl", '\ufeff{"text": "A fine film."}\n'.encode("utf-8"))
    outs = []
    for path in (plain, bom):
        assert main(["predict", "--model-dir", str(folder), "--input", str(path), "--device", "cpu"]) == 0
        outs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert outs[0] == outs[1] and outs[1][0]["text"] == "A fine film."


def wal_database(path: Path) -> None:
    """A results database in WAL mode, closed cleanly (SQLite then removes the -wal and -shm files)."""
    with Store(path) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not path.with_name(path.name + "-wal").exists()


def read_unprivileged(argv: list[str]) -> tuple[int, str]:
    """`main(argv)` as a user who cannot write the database's folder. As root (whom chmod does not stop), in a
    forked child that drops to uid 65534 (nobody) first; the child needs no file outside the folder, as
    everything it runs is imported beforehand."""
    import fewtune.cli_grid  # noqa: F401
    import fewtune.report.data  # noqa: F401
    if os.geteuid() != 0:
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return main(argv), err.getvalue()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stdout, sys.stderr = open(os.devnull, "w"), os.fdopen(write, "w")
            code = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_results_from_a_read_only_folder(tmp_path_factory):
    """`fewtune results` only reads: a WAL database in a folder this user cannot write is listed (SQLite refuses
    a plain read-only open there, as it cannot create the -shm index)."""
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="fewtune-ro-"))  # under /tmp, reachable by the unprivileged child
    try:
        os.chmod(top, 0o755)
        db = top / "fewtune.db"
        wal_database(db)
        with Store(db) as store:
            from fewtune.config import RunConfig
            cfg = RunConfig(model="m", task="cola", shots=2)
            store.claim(cfg, "icl", "g")
            store.finish(cfg.hash(), {"evals": {}, "cost": {}, "versions": {}})
        before = db.read_bytes()
        os.chmod(db, 0o644)
        os.chmod(top, 0o555)
        code, err = read_unprivileged(["results", "--db", str(db), "--format", "json"])
        assert code == 0, err
        assert "Traceback" not in err
        assert db.read_bytes() == before and sorted(p.name for p in top.iterdir()) == ["fewtune.db"]
    finally:
        os.chmod(top, 0o755)
        shutil.rmtree(top)


def test_a_read_only_open_with_changes_in_the_wal_is_named(tmp_path, monkeypatch):
    """Where the -wal file still holds changes, immutable reading would miss them: the error says why instead."""
    import fewtune.store
    db = tmp_path / "fewtune.db"
    wal_database(db)
    db.with_name(db.name + "-wal").write_bytes(b"\x00" * 32)
    real = sqlite3.connect

    def connect(target, *args, **kwargs):  # what SQLite answers in a folder it cannot write
        if "mode=ro" in str(target):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(target, *args, **kwargs)
    monkeypatch.setattr(fewtune.store.sqlite3, "connect", connect)
    monkeypatch.setattr(fewtune.store.time, "sleep", lambda s: None)
    with pytest.raises(Exception, match="folder is not writable and the write-ahead log"):
        Store(db, readonly=True)


def test_zero_byte_database_is_a_new_database_in_dry_run_and_run(env, capsys):
    """One behaviour for both: a 0-byte file is a new, empty database (a real run creates the tables in it)."""
    empty = env.write("empty.db", b"")
    assert main(["grid", str(env.spec), "--db", str(empty), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "new" in out and "1 cells, 1 to run" in out
    assert empty.read_bytes() == b""  # a dry run writes nothing
    with Store(empty) as store:  # what `fewtune grid` opens
        assert store.statuses() == {}


# ----------------------------------------------------------------------------- 19: a damaged row
def damage(db: Path, column: str, value) -> str:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        key = conn.execute("SELECT config_hash FROM runs WHERE status='success' ORDER BY rowid").fetchone()[0]
        conn.execute(f"UPDATE runs SET {column}=? WHERE config_hash=?", (value, key))
    finally:
        conn.close()
    return key


@pytest.mark.parametrize("column, value", [("metrics", '{"dev": {"accuracy": 0.'), ("config", b"{\xff\xfe}"),
                                           ("result", "not json")])
def test_a_damaged_row_is_named_and_the_others_are_listed(env, capsys, caplog, column, value):
    key = damage(env.db, column, value)
    before = env.db.read_bytes()
    assert main(["results", "--db", str(env.db), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert len(rows) == 2 and key not in {r["config_hash"] for r in rows}
    warnings = [r.getMessage() for r in caplog.records if key in r.getMessage()]  # stderr, through logging
    assert len(warnings) == 1 and f"column '{column}'" in warnings[0] and "Traceback" not in err
    assert main(["results", "--db", str(env.db)]) == 0
    assert "(2 runs)" in capsys.readouterr().out
    assert env.db.read_bytes() == before


def test_report_goes_on_past_a_damaged_row(env, capsys, caplog):
    key = damage(env.db, "metrics", "{")
    out = env.root / "report"
    assert main(["report", "--db", str(env.db), "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert [r for r in caplog.records if key in r.getMessage() and "column 'metrics'" in r.getMessage()]
    assert (out / "report.md").is_file()


# ----------------------------------------------------------------------------- 19/20: figure file names
def test_figure_names_are_distinct_and_short():
    from fewtune.report.figures import slug
    assert slug("cola") == "cola" and slug("smollm2-135m") == "smollm2-135m"  # plain names stay as they are
    names = ["my_task", "my-task", "My-Task", "a/b", "a-b", "x" * 300, "x" * 301, "/tmp/" + "d" * 250 + "/t.toml"]
    slugs = [slug(n) for n in names]
    assert len(set(slugs)) == len(slugs)
    assert all(len(s) <= 70 and re.fullmatch(r"[a-z0-9.-]+", s) for s in slugs)


def test_figures_of_long_and_near_identical_task_names_are_written(tmp_path):
    """Two tasks whose names differ only in `-`/`_` get two figure files; a very long task path still fits a
    file name (255 bytes)."""
    import matplotlib.pyplot as plt
    from fewtune.report import figures
    names = []
    for task in ("sst_2", "sst-2", "/tmp/" + "deep-folder/" * 30 + "task.toml"):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        names.append(figures.save(fig, tmp_path, f"accuracy-vs-{figures.key_slug('train_seconds')}-"
                                                 f"{figures.slug(task)}-{figures.slug('facebook/opt-125m')}"))
    assert len(set(names)) == 3
    assert all((tmp_path / f"{n}.png").is_file() and (tmp_path / f"{n}.svg").is_file() for n in names)


# ----------------------------------------------------------------------------- 23: no file contents in errors
def test_errors_do_not_echo_file_contents(env, capsys):
    """A header row that lacks the task's column is described by its column count; names appear (bounded) only
    for a file under the data root, never for a file an absolute path reaches."""
    secret = env.write("elsewhere/secret.tsv", "TOPSECRET-first-line-of-a-private-file\n")
    task = env.task_with('path = "toy/dev.tsv"', f'path = "{secret}"')
    assert main(env.run(task=task)) == 2
    line = assert_one_line_error(2, capsys.readouterr().err, ["secret.tsv", "column 'text'", "1 column)"])
    assert "TOPSECRET" not in line
    no_header = env.task_with('local = { path = "toy/dev.tsv", format = "tsv", header = true }',
                              f'local = {{ path = "{secret}", format = "tsv", header = false }}', name="nh.toml")
    no_header.write_text(no_header.read_text().replace('columns = { text = "text", label = "label" }\nlabel_map = { "0" = "negative", "1" = "positive" }\n\n[splits.ood]',
                                                       'columns = { text = 0, label = 0 }\nlabel_map = { "0" = "negative", "1" = "positive" }\n\n[splits.ood]'))
    assert 'text = 0, label = 0' in no_header.read_text()
    assert main(env.run(task=no_header)) == 2
    line = assert_one_line_error(2, capsys.readouterr().err, ["secret.tsv line 1", "the label is not in"])
    assert "TOPSECRET" not in line

    long_header = "\t".join(["text", "label"] + [f"c{i}-" + "x" * 100 for i in range(20)])
    rows = "\n".join("\t".join(["A fine film.", "1"] + ["y"] * 20) for _ in range(4))
    data = env.data_copy("dev", f"{long_header.replace('text', 'sentence', 1)}\n{rows}\n")
    assert main(env.run(data=data)) == 2
    line = assert_one_line_error(2, capsys.readouterr().err, ["dev.tsv", "column 'text'", "22 columns", "more"])
    assert "x" * 30 not in line and len(line) < 400

    data = env.data_copy("train", "text\tlabel\nA fine film.\t" + "L" * 500 + "\n")
    assert main(env.run(data=data)) == 2
    line = assert_one_line_error(2, capsys.readouterr().err, ["train.tsv line 2", "is not in the task's label_map"])
    assert "L" * 30 not in line


def test_a_relative_path_inside_the_root_and_an_absolute_path_are_accepted(env, capsys):
    task = env.task_with('path = "toy/dev.tsv"', 'path = "toy/../toy/dev.tsv"')
    assert main(env.run(task=task)) == 0, capsys.readouterr().err
    task = env.task_with('path = "toy/dev.tsv"', f'path = "{env.data / "toy" / "dev.tsv"}"', name="abs.toml")
    assert main(env.run(task=task)) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- 18: docs and code agree
SRC = Path(__file__).resolve().parents[1] / "src" / "fewtune"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_no_code_cites_a_file_the_repository_lacks():
    cited = [p for p in SRC.rglob("*") if p.suffix in (".py", ".toml") and "DESIGN.md" in p.read_text()]
    assert not cited


def test_every_method_info_key_is_documented():
    results_md = (DOCS / "results.md").read_text()
    keys = {k for p in (SRC / "methods").glob("*.py") for k in re.findall(r'ctx\.info\["(\w+)"\] *=', p.read_text())}
    keys -= {"demonstrations"}  # not stored: runner.py leaves it out of method_info
    assert "distill_loss_sum" in keys
    assert not [k for k in sorted(keys) if f"`{k}`" not in results_md]

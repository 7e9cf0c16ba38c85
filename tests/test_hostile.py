"""Hostile input: every bad input the CLI, a task file, a grid spec, a data file or the results database can
bring gives one line that names what and where, a non-zero exit, no traceback, and the results already in
the database stay exactly as they were.

Each case builds its bad input in a temporary folder and returns the command line; `fewtune.cli.main` runs
in process (fast). Only the locked database needs a second process (the one holding the lock).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from fewtune.cli import main
from fewtune.store import Store

GRID_SPEC = textwrap.dedent('''
    name = "hostile"
    models = ["fake-model"]
    tasks = ["cola"]
    shots = [2]
    seeds = [0]

    [[methods]]
    method = "icl"
''')


@dataclass
class Env:
    root: Path        # the temporary folder
    db: Path          # the results database holding earlier results
    data: Path        # a copy of the toy data root (cases may damage it)
    task: Path        # the toy task file (in data)
    model: Path       # the tiny model folder (read-only: copy before damaging)
    spec: Path        # a valid grid spec

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def run(self, *extra: str, task: Path | None = None, data: Path | None = None, model: Path | None = None) -> list[str]:
        """A valid, small `fewtune run` (icl on the toy task, tiny model) with `extra` flags."""
        return ["run", "--task", str(task or self.task), "--data-root", str(data or self.data), "--model",
                str(model or self.model), "--method", "icl", "--shots", "2", "--eval-limit", "4", "--max-length", "64",
                "--device", "cpu", "--quiet", *extra]

    def task_with(self, old: str, new: str, name: str = "bad-task.toml") -> Path:
        text = self.task.read_text()
        assert old in text
        return self.write(name, text.replace(old, new, 1))

    def grid(self, text: str, name: str = "bad-grid.toml") -> list[str]:
        return ["grid", str(self.write(name, text)), "--db", str(self.db)]

    def data_copy(self, split: str, content: str | bytes) -> Path:
        """A data root like the toy one whose `split` file holds `content`."""
        folder = self.root / f"data-{split}"
        shutil.copytree(self.data, folder)
        path = folder / "toy" / f"{split}.tsv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return folder

    def model_copy(self, drop=(), add: dict | None = None) -> Path:
        folder = self.root / "model-copy"
        shutil.copytree(self.model, folder)
        for name in drop:
            (folder / name).unlink()
        for name, text in (add or {}).items():
            (folder / name).write_text(text)
        return folder


def other_db(env: Env, content: bytes) -> list[str]:
    path = env.write("other.db", content)
    return ["results", "--db", str(path)]


def truncated_db(env: Env) -> bytes:
    """A real fewtune database cut after its first pages."""
    path = env.root / "to-cut.db"
    with Store(path) as store:
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    return data[: len(data) // 2] + b"\x00" * 100


# id, builds the input -> argv, fragments the one-line error must hold
CASES = [
    # --- the command line
    ("cli-unknown-command", lambda e: ["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ("cli-shots-not-int", lambda e: e.run("--shots", "many"), ["--shots", "invalid int value: 'many'"]),
    ("cli-negative-shots", lambda e: e.run("--shots", "-3"), ["'shots' must be ≥ 0"]),
    ("cli-unknown-method", lambda e: e.run("--method", "lorra"), ["Unknown method 'lorra'", "Did you mean: lora"]),
    ("cli-zero-eval-limit", lambda e: e.run("--eval-limit", "0"), ["'eval_limit' must be a positive integer"]),
    ("cli-negative-lr", lambda e: e.run("--lr", "-1"), ["'lr' must be a non-negative number"]),
    ("cli-nan-lr", lambda e: e.run("--lr", "nan"), ["'lr' must be a non-negative number"]),
    ("cli-huge-shots", lambda e: e.run("--shots", "9" * 30), ["'shots' must be", "at most"]),
    ("cli-huge-seed", lambda e: e.run("--seed", str(2**64)), ["'seed' must be", "at most"]),
    ("cli-negative-seed", lambda e: e.run("--seed", "-1"), ["'seed' must be an integer ≥ 0"]),
    ("cli-fp16", lambda e: e.run("--dtype", "fp16"), ["'dtype' must be one of auto, fp32, bf16"]),
    ("cli-option-of-another-method", lambda e: e.run("--lora-r", "4"), ["--lora-r applies to method(s) lora"]),
    ("cli-no-gpu", lambda e: e.run("--device", "cuda"), ["--device cuda: no CUDA GPU"]),
    ("cli-output-folder-missing", lambda e: e.run("--output", str(e.root / "nope" / "r.json")),
     ["--output", "folder", "nope", "does not exist"]),
    ("cli-output-under-a-file", lambda e: e.run("--output", str(e.write("a-file", "x") / "r.json")),
     ["--output", "a-file is a file, not a folder"]),
    ("cli-config-missing", lambda e: e.run("--config", str(e.root / "missing.toml")),
     ["Config file", "missing.toml", "does not exist"]),
    ("cli-config-is-a-folder", lambda e: e.run("--config", str(e.root)), ["Config file", "cannot be read"]),
    ("cli-config-truncated", lambda e: e.run("--config", str(e.write("c.toml", "shots = "))),
     ["Config file", "c.toml", "not valid TOML"]),
    ("cli-config-latin1", lambda e: e.run("--config", str(e.write("c.toml", "pattern = 0 # caf\xe9".encode("latin-1")))),
     ["Config file", "c.toml", "not UTF-8"]),
    ("cli-config-wrong-type", lambda e: e.run("--config", str(e.write("c.toml", 'eval_batch_size = "big"'))),
     ["'eval_batch_size' must be an integer"]),
    ("cli-config-truthy-string", lambda e: e.run("--config", str(e.write("c.toml", 'trust_remote_code = "false"'))),
     ["'trust_remote_code' must be true or false"]),
    ("cli-config-unknown-key", lambda e: e.run("--config", str(e.write("c.toml", "shotz = 4"))),
     ["c.toml", "unknown field 'shotz'", "Did you mean: shots"]),
    ("cli-config-huge-epochs", lambda e: e.run("--config", str(e.write("c.toml", "epochs = 9223372036854775807"))),
     ["'epochs' must be", "at most"]),
    ("cli-predict-not-a-model-folder", lambda e: ["predict", "--model-dir", str(e.root), "--input", str(e.task)],
     ["is not a fewtune model folder"]),
    ("cli-predict-corrupt-manifest", lambda e: ["predict", "--model-dir", str(e.write("m/fewtune.json", '{"task": ').parent),
                                                "--input", str(e.task)], ["fewtune.json", "not valid JSON"]),
    ("cli-results-unknown-status", lambda e: ["results", "--db", str(e.db), "--status", "done"], ["--status done"]),
    ("cli-results-parquet-to-stdout", lambda e: ["results", "--db", str(e.db), "--format", "parquet"],
     ["--format parquet needs --output"]),
    ("cli-report-out-is-a-file", lambda e: ["report", "--db", str(e.db), "--out", str(e.write("rep", "x"))],
     ["--out", "rep", "is a file"]),
    # --- task files
    ("task-missing", lambda e: e.run(task=e.root / "nope.toml"), ["Task file", "nope.toml", "does not exist"]),
    ("task-empty", lambda e: e.run(task=e.write("t.toml", "")), ["t.toml", "missing key 'name'"]),
    ("task-truncated", lambda e: e.run(task=e.write("t.toml", e.task.read_text()[:300])), ["t.toml"]),
    ("task-latin1", lambda e: e.run(task=e.write("t.toml", 'name = "caf\xe9"'.encode("latin-1"))),
     ["Task file", "t.toml", "not UTF-8"]),
    ("task-labels-not-a-list", lambda e: e.run(task=e.task_with('labels = ["negative", "positive"]', 'labels = "yes"')),
     ["bad-task.toml", "'labels' must be list"]),
    ("task-unknown-key", lambda e: e.run(task=e.task_with('version = 1', 'version = 1\nverison = 2')),
     ["bad-task.toml", "unknown key 'verison'", "Did you mean: version"]),
    ("task-verbalizer-count", lambda e: e.run(task=e.task_with('verbalizer = [" No", " Yes"]', 'verbalizer = [" No"]')),
     ["bad-task.toml patterns[0]", "verbalizer has 1 words for 2 labels"]),
    ("task-template-unknown-field", lambda e: e.run(task=e.task_with("{text}\\n", "{txet}\\n")),
     ["bad-task.toml patterns[0]", "{txet}"]),
    ("task-pattern-index-out-of-range", lambda e: e.run("--pattern", "7"), ["Task 'toy'", "--pattern 7 does not exist"]),
    ("task-huge-pattern-index", lambda e: e.run("--pattern", str(10**12)), ["'pattern' must be at most"]),
    ("task-is-a-folder", lambda e: e.run(task=_folder(e, "folder.toml")), ["Task file", "folder.toml is a folder"]),
    # --- data files
    ("data-root-missing", lambda e: e.run(data=e.root / "no-data"), ["Data folder", "no-data", "does not exist"]),
    ("data-file-missing", lambda e: e.run(data=_without(e, "dev")),
     ["Data file", "dev.tsv", "does not exist"]),
    ("data-file-empty", lambda e: e.run(data=e.data_copy("train", "")), ["Data file", "train.tsv", "is empty"]),
    ("data-file-latin1", lambda e: e.run(data=e.data_copy("dev", "text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))),
     ["Data file", "dev.tsv", "not UTF-8"]),
    ("data-file-truncated-row", lambda e: e.run(data=e.data_copy("dev", "text\tlabel\nA fine film.\t1\nA cut row")),
     ["dev.tsv line 3", "expected 2 columns, found 1"]),
    ("data-file-unknown-label", lambda e: e.run(data=e.data_copy("dev", "text\tlabel\nA fine film.\t7\n")),
     ["dev.tsv line 2", "label '7'"]),
    ("data-file-wrong-header", lambda e: e.run(data=e.data_copy("dev", "sentence\tgold\nA fine film.\t1\n")),
     ["dev.tsv", "column 'text'"]),
    ("data-too-few-for-shots", lambda e: e.run("--shots", "1000", "--uniform"), ["--shots 1000", "training examples"]),
    # --- models
    ("model-folder-without-config", lambda e: e.run(model=e.model_copy(drop=["config.json"])),
     ["model-copy", "has no config.json"]),
    ("model-config-truncated", lambda e: e.run(model=e.model_copy(add={"config.json": '{"model_type": "lla'})),
     ["model-copy"]),
    ("model-remote-code-not-trusted", lambda e: e.run(model=e.model_copy(add=REMOTE_CODE)),
     ["model-copy", "its own Python code", "--trust-remote-code"]),
    ("model-only-pickled-weights", lambda e: e.run(model=pickled_only(e)),
     ["model-copy", "--allow-unsafe-weights"]),
    # --- grid specs
    ("grid-missing", lambda e: ["grid", str(e.root / "nope.toml"), "--db", str(e.db)], ["nope.toml", "does not exist"]),
    ("grid-empty", lambda e: e.grid(""), ["bad-grid.toml", "missing 'models'"]),
    ("grid-truncated", lambda e: e.grid(GRID_SPEC[:60]), ["bad-grid.toml", "not valid TOML"]),
    ("grid-latin1", lambda e: ["grid", str(e.write("g.toml", "name = 'caf\xe9'".encode("latin-1"))), "--db", str(e.db)],
     ["g.toml", "not UTF-8"]),
    ("grid-binary", lambda e: ["grid", str(e.write("g.toml", bytes(range(256)))), "--db", str(e.db)], ["g.toml"]),
    ("grid-models-wrong-type", lambda e: e.grid(GRID_SPEC.replace('["fake-model"]', "3")),
     ["bad-grid.toml", "'models' must hold str values"]),
    ("grid-unknown-key", lambda e: e.grid(GRID_SPEC.replace("seeds", "sedes")), ["bad-grid.toml", "unknown key 'sedes'"]),
    ("grid-methods-not-tables", lambda e: e.grid(GRID_SPEC.split("[[methods]]")[0] + 'methods = ["icl"]'),
     ["bad-grid.toml", "'methods' must be a list of tables"]),
    ("grid-unknown-method-option", lambda e: e.grid(GRID_SPEC + 'method_options = { rank = 4 }\n'),
     ["bad-grid.toml methods[0]", "no option 'rank'"]),
    ("grid-huge-shots", lambda e: e.grid(GRID_SPEC.replace("shots = [2]", "shots = [9223372036854775807]")),
     ["bad-grid.toml", "'shots' must be", "at most"]),
    ("grid-resources-unknown-key", lambda e: e.grid(GRID_SPEC.replace("seeds = [0]", "seeds = [0]\n[resources]\ncpus = 2")),
     ["bad-grid.toml", "unknown key 'resources.cpus'", "Did you mean: num_cpus"]),
    ("grid-resources-huge", lambda e: e.grid(GRID_SPEC.replace("seeds = [0]", "seeds = [0]\n[resources]\nnum_gpus = 1e9")),
     ["bad-grid.toml", "'resources.num_gpus' must be ≥ 0 and at most 1024"]),
    ("grid-resources-wrong-type", lambda e: e.grid(GRID_SPEC.replace("seeds = [0]", 'seeds = [0]\n[resources]\nmemory_gib = "16G"')),
     ["bad-grid.toml", "'resources.memory_gib' must be a number"]),
    ("grid-resources-not-a-table", lambda e: e.grid('resources = 4\n' + GRID_SPEC), ["'resources' must be a table"]),
    ("grid-max-retries-negative", lambda e: e.grid('max_retries = -1\n' + GRID_SPEC), ["'max_retries' must be an integer"]),
    ("grid-cli-max-retries-huge", lambda e: ["grid", str(e.spec), "--db", str(e.db), "--backend", "ray", "--dry-run",
                                             "--max-retries", "1000000"], ["--max-retries", "from 0 to 100"]),
    ("grid-address-without-ray", lambda e: ["grid", str(e.spec), "--db", str(e.db), "--address", "127.0.0.1:1"],
     ["--address applies to --backend ray and ray-warm only"]),
    ("grid-bad-address", lambda e: ["grid", str(e.spec), "--db", str(e.db), "--backend", "ray", "--address", "nowhere"],
     ["--address nowhere", "HOST:PORT"]),
    # --- the results database
    ("db-is-a-folder", lambda e: ["grid", str(e.spec), "--db", str(e.root)], ["Results database", "is a folder"]),
    ("db-under-a-file", lambda e: ["grid", str(e.spec), "--db", str(e.write("plain", "x") / "r.db")],
     ["Results database", "plain is a file, not a folder"]),
    ("db-cannot-be-created", lambda e: ["grid", str(e.spec), "--db", "/proc/fewtune-test.db"],
     ["Results database /proc/fewtune-test.db cannot be created or opened there"]),
    ("db-missing-for-results", lambda e: ["results", "--db", str(e.root / "none.db")], ["No results database", "none.db"]),
    ("db-not-sqlite", lambda e: other_db(e, b"id,accuracy\n1,0.5\n"), ["other.db", "not an SQLite file"]),
    ("db-corrupt", lambda e: other_db(e, b"SQLite format 3\x00" + bytes(range(256)) * 20), ["other.db", "cannot be used"]),
    ("db-truncated", lambda e: other_db(e, truncated_db(e)), ["other.db"]),
    ("db-empty-file-for-report", lambda e: ["report", "--db", str(e.write("other.db", b""))], ["other.db", "empty"]),
]

REMOTE_CODE = {
    "config.json": json.dumps({"model_type": "evil", "architectures": ["EvilModel"],
                               "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                            "AutoModelForCausalLM": "modeling_evil.EvilModel"}}),
    "configuration_evil.py": "import pathlib; pathlib.Path(__file__).with_name('EXECUTED').write_text('!')\n"
                             "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n"
                             "    model_type = 'evil'\n",
    "modeling_evil.py": "import pathlib; pathlib.Path(__file__).with_name('EXECUTED').write_text('!')\n",
}


def _folder(env: Env, name: str) -> Path:
    (env.root / name).mkdir()
    return env.root / name


def _without(env: Env, split: str) -> Path:
    folder = env.root / f"data-no-{split}"
    shutil.copytree(env.data, folder)
    (folder / "toy" / f"{split}.tsv").unlink()
    return folder


def pickled_only(env: Env) -> Path:
    """The tiny model folder with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file
    folder = env.model_copy()
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def snapshot(db: Path):
    """Everything in the results database (rows and meta), read without changing it."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return (conn.execute("SELECT * FROM runs ORDER BY config_hash").fetchall(),
                conn.execute("SELECT * FROM meta ORDER BY key").fetchall())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def results_db(tmp_path_factory) -> Path:
    """A database with earlier results: two successes and a failure."""
    from fewtune.config import RunConfig
    path = tmp_path_factory.mktemp("earlier") / "fewtune.db"
    with Store(path) as store:
        for seed in (0, 1, 2):
            cfg = RunConfig(model="fake-model", task="cola", shots=2, seed=seed)
            store.claim(cfg, "icl", "earlier")
            if seed < 2:
                store.finish(cfg.hash(), {"evals": {"dev": {"accuracy": 0.5 + seed / 10}}, "cost": {}, "versions": {}})
            else:
                store.fail(cfg.hash(), "RuntimeError: earlier failure")
    return path


@pytest.fixture
def env(tmp_path, toy, tiny_model_dir, results_db, monkeypatch) -> Env:
    data = tmp_path / "data"
    shutil.copytree(toy.root, data)
    db = tmp_path / "results" / "fewtune.db"
    db.parent.mkdir()
    shutil.copy(results_db, db)
    monkeypatch.setenv("FEWTUNE_DB", str(db))
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", "fewtune.no_such_runner:run")  # a grid must never get to run a cell
    spec = tmp_path / "grid.toml"
    spec.write_text(GRID_SPEC)
    return Env(root=tmp_path, db=db, data=data, task=data / "toy.toml", model=tiny_model_dir, spec=spec)


def assert_one_line_error(code: int, err: str, fragments) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("fewtune: error: ")]
    assert len(lines) == 1, err
    line = lines[0]
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.mark.parametrize("make, fragments", [pytest.param(m, f, id=i) for i, m, f in CASES])
def test_bad_input_is_one_line_and_harmless(env, make, fragments, capsys):
    argv = make(env)
    before = snapshot(env.db)
    other = [Path(a) for a in argv if a.endswith(".db") and Path(a).is_file() and Path(a) != env.db]
    other_bytes = {p: p.read_bytes() for p in other}
    code = main(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, fragments)
    assert snapshot(env.db) == before
    for p, data in other_bytes.items():  # a database fewtune refused is left byte for byte
        assert p.read_bytes() == data
    assert not (env.root / "model-copy" / "EXECUTED").exists()  # no remote code ran


def test_database_locked_by_another_process(env, monkeypatch, capsys):
    """A child process holds BEGIN EXCLUSIVE on the database: the grid waits (here 1 s), then stops with one line
    naming the file and the lock; the rows are unchanged once the lock is gone."""
    import fewtune.store
    monkeypatch.setattr(fewtune.store, "BUSY_TIMEOUT_S", 1.0)
    before = snapshot(env.db)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
                               "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(60)\n", str(env.db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["grid", str(env.spec), "--db", str(env.db)])
        line = assert_one_line_error(code, capsys.readouterr().err, [str(env.db), "locked by another process"])
        assert "corrupt" not in line
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(env.db) == before


def test_pickled_weights_need_the_opt_in(env, capsys):
    """A model folder with only pytorch_model.bin: refused without --allow-unsafe-weights, loaded with it."""
    folder = pickled_only(env)
    assert main(env.run(model=folder)) == 2
    assert_one_line_error(2, capsys.readouterr().err, ["--allow-unsafe-weights", "safetensors"])
    assert main(env.run("--allow-unsafe-weights", model=folder)) == 0
    assert "icl on " in capsys.readouterr().out


def test_safety_switches_default_off_and_reach_the_loaders(env, monkeypatch, tmp_path):
    """trust_remote_code and allow_unsafe_weights are False unless asked for, in `run` and in a grid spec, and the
    runner hands them to every loader."""
    from fewtune.cli import build_parser, config_from_args
    from fewtune.config import RunConfig
    from fewtune.engine import models
    from fewtune.grid import expand
    assert RunConfig().trust_remote_code is False and RunConfig().allow_unsafe_weights is False
    cfg = config_from_args(build_parser().parse_args(["run"]))
    assert (cfg.trust_remote_code, cfg.allow_unsafe_weights) == (False, False)
    cfg = config_from_args(build_parser().parse_args(["run", "--trust-remote-code", "--allow-unsafe-weights"]))
    assert (cfg.trust_remote_code, cfg.allow_unsafe_weights) == (True, True)
    base = {"models": ["m"], "tasks": ["cola"], "methods": [{"method": "icl"}]}
    assert all(not c.config.allow_unsafe_weights and not c.config.trust_remote_code for c in expand(base).cells)
    opted = expand({**base, "allow_unsafe_weights": True, "trust_remote_code": True}).cells
    assert all(c.config.allow_unsafe_weights and c.config.trust_remote_code for c in opted)

    seen = []
    real_tok, real_model = models.load_tokenizer, models.load_model
    monkeypatch.setattr(models, "load_tokenizer", lambda spec, trust=False: seen.append(("tokenizer", trust))
                        or real_tok(spec, trust))
    monkeypatch.setattr(models, "load_model", lambda spec, obj="lm", n=2, trust=False, unsafe=False:
                        seen.append(("model", trust, unsafe)) or real_model(spec, obj, n, trust, unsafe))
    assert main(env.run()) == 0
    assert seen == [("tokenizer", False), ("model", False, False)]


def test_no_code_runs_on_user_files():
    """Task files, grid specs and configs are read with tomllib; nothing in fewtune unpickles or evaluates."""
    src = Path(__file__).resolve().parents[1] / "src" / "fewtune"
    text = {p: p.read_text() for p in src.rglob("*.py")}
    for p, t in text.items():
        for banned in ("import pickle", "pickle.load", "torch.load(", "yaml.load", " eval(", " exec(", "__import__(\"pickle"):
            assert banned not in t, f"{banned} in {p}"
    assert all("tomllib.loads" in text[src / name] for name in ("grid/grid_spec.py", "cli.py", "tasks/__init__.py"))

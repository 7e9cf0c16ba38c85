"""The `fewtune` command, called as a function: listings, a run on the tiny model folder, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TOY_TASK, toy_rows, write_tsv

from fewtune.cli import main
from fewtune.config import RunConfig
from fewtune.data import load_split, sample_train
from fewtune.tasks import load_task


def tiny_args(toy, model_dir, *extra, shots=4):
    return ["run", "--task", str(toy.task_file), "--data-root", str(toy.root), "--model", str(model_dir),
            "--shots", str(shots), "--eval-limit", "6", "--dtype", "fp32", "--device", "cpu", "-q", *extra]


def one_line_error(capsys, argv) -> str:
    """Run the CLI, expect exit code 2 and exactly one stderr line `fewtune: error: ...`, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fewtune: error:") and "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- ls
@pytest.mark.parametrize("what, names", [
    ("tasks", ["cola", "mnli"]),
    ("methods", ["icl", "ft", "pbft", "adaptive", "lora", "cd", "peft", "probe", "lpft", "bitfit"]),
    ("models", ["smollm2-135m", "gemma3-270m"]),
])
def test_ls(capsys, what, names):
    assert main(["ls", what]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line and not line.startswith("(") and not line[0].isspace()}  # indented: a method's details
    assert listed == set(names)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: fewtune" in capsys.readouterr().out


# ----------------------------------------------------------------------------- run
@pytest.fixture(scope="module")
def two_runs(toy, tiny_model_dir, tmp_path_factory):
    """The same pbft command twice, each writing its result JSON."""
    out = tmp_path_factory.mktemp("cli-run")
    results = []
    for i in range(2):
        path = out / f"result-{i}.json"
        assert main(tiny_args(toy, tiny_model_dir, "--method", "pbft", "--epochs", "3", "--batch-size", "4",
                              "--lr", "1e-3", "--seed", "1", "-o", str(path))) == 0
        results.append(json.loads(path.read_text()))
    return results


def test_run_writes_a_complete_result(two_runs, toy):
    r = two_runs[0]
    for key in ("config", "config_hash", "seeds", "train_indices", "evals", "cost", "training", "versions", "git",
                "machine", "task", "hyperparameters", "method_info", "started_at", "finished_at"):
        assert key in r, key
    assert set(r["evals"]) == {"dev", "ood"}
    for e in r["evals"].values():
        assert e["n"] == 6 and 0 <= e["accuracy"] <= 1 and -1 <= e["mcc"] <= 1
        assert sum(map(sum, e["confusion"])) == e["n"]
    assert r["evals"]["dev"]["role"] == "in_domain" and r["evals"]["ood"]["role"] == "out_of_domain"
    cost = r["cost"]
    for key in ("train_seconds", "eval_seconds", "peak_memory_mib", "trainable_params", "total_params",
                "train_examples_per_s", "eval_examples_per_s", "train_tokens", "eval_tokens", "load_seconds"):
        assert cost[key] is not None and cost[key] >= 0, key
    assert cost["trainable_params"] == cost["total_params"] > 0  # pbft trains everything
    assert cost["peak_memory_mib"] > 0 and cost["train_tokens"] > 0
    assert r["training"]["steps"] == 3 and len(r["training"]["epoch_losses"]) == 3
    assert r["training"]["final_loss"] > 0 and 0 <= r["training"]["train_accuracy"] <= 1
    assert all(r["versions"][p] for p in ("torch", "transformers", "peft"))
    assert set(r["git"]) == {"commit", "dirty"} and r["machine"]["cpu_count"] >= 1
    assert r["seeds"] == {"data_seed": 1, "train_seed": 1, "eval_subsample_seed": 0}
    assert r["seed_free"] is False  # pbft trains on the seeded sample (zero-shot icl: True, tests/test_methods.py)


def test_result_is_enough_to_reproduce_the_run(two_runs, toy):
    r = two_runs[0]
    cfg = RunConfig.from_dict(r["config"])
    assert cfg.hash() == r["config_hash"]
    task = load_task(cfg.task)
    pool = load_split(task, task.train, cfg.data_root)
    assert r["train_indices"] == [pool[p].idx for p in sample_train(pool, cfg.shots, cfg.seed, len(task.labels))]
    assert len(r["train_indices"]) == 4 and r["train_label_counts"] == {"0": 2, "1": 2}


def test_the_same_command_twice_gives_identical_metrics(two_runs):
    first, second = two_runs

    def metrics(r):
        return {k: {m: v for m, v in e.items() if m != "seconds"} for k, e in r["evals"].items()}
    assert metrics(first) == metrics(second)
    assert first["training"]["epoch_losses"] == second["training"]["epoch_losses"]
    assert first["train_indices"] == second["train_indices"] and first["config_hash"] == second["config_hash"]


def test_zero_shot_is_recorded_seed_free_and_predicts_the_same_under_any_seed(toy, tiny_model_dir, tmp_path):
    """icl with 0 shots says it is seed-free (the grid runs it once): under two data seeds its predictions are equal."""
    results = []
    for seed in (0, 7):
        path = tmp_path / f"zero{seed}.json"
        assert main(tiny_args(toy, tiny_model_dir, "--method", "icl", "--seed", str(seed), "-o", str(path),
                              shots=0)) == 0
        results.append(json.loads(path.read_text()))
    assert [r["seed_free"] for r in results] == [True, True]
    assert results[0]["config_hash"] != results[1]["config_hash"]  # two runs by identity; one prediction
    assert results[0]["predictions"] == results[1]["predictions"]


def test_config_file_with_flag_override(toy, tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'task = "{toy.task_file}"\nmodel = "{tiny_model_dir}"\ndata_root = "{toy.root}"\n'
                      f'method = "icl"\nshots = 2\neval_limit = 4\ndtype = "fp32"\n')
    out = tmp_path / "r.json"
    assert main(["run", "--config", str(config), "--shots", "4", "-q", "-o", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["config"]["shots"] == 4 and r["config"]["eval_limit"] == 4
    assert r["cost"]["trainable_params"] == 0 and r["training"] is None
    assert "result written to" in capsys.readouterr().out


def test_config_hash_is_the_runs_identity(toy, tmp_path):
    """Where and how a run executes is not part of its identity; the data's content, the task's content and the
    normalised method options are; the task file's path is not."""
    import shutil
    base = dict(task=str(toy.task_file), data_root=str(toy.root), method="pbft", shots=4)
    a = RunConfig(**base)
    copy = tmp_path / "copy"
    shutil.copytree(toy.root, copy)
    assert a.hash() == RunConfig(**{**base, "data_root": str(copy)}, device="cpu", eval_batch_size=3).hash()
    assert a.hash() == RunConfig(**{**base, "data_source": "local"}).hash()
    assert a.hash() != RunConfig(**{**base, "shots": 8}).hash()
    with open(copy / "toy" / "dev.tsv", "a") as f:
        f.write("an extra line\t1\n")
    assert a.hash() != RunConfig(**{**base, "data_root": str(copy)}).hash()  # other data, another experiment
    moved = tmp_path / "elsewhere" / "same-task.toml"
    moved.parent.mkdir()
    moved.write_text(toy.task_file.read_text() + "\n# a comment changes nothing\n")
    assert a.hash() == RunConfig(**{**base, "task": str(moved)}).hash()
    moved.write_text(toy.task_file.read_text().replace('"{text} ?"', '"{text} !"'))
    assert a.hash() != RunConfig(**{**base, "task": str(moved)}).hash()  # an edited pattern is another experiment
    cd = dict(base, method="cd")
    assert RunConfig(**cd).hash() == RunConfig(**cd, method_options={"context": "instruction", "alpha": 0.5}).hash()
    assert RunConfig(**cd).hash() != RunConfig(**cd, method_options={"alpha": 0.7}).hash()


def test_a_local_model_folder_is_identified_by_its_content(toy, tiny_model_dir, tmp_path):
    """A model folder's path is not its identity, its files are: the same files elsewhere are the same model;
    weights written again into the same folder are another (no pooling of the old runs with the new)."""
    import shutil
    base = dict(task=str(toy.task_file), data_root=str(toy.root), method="pbft", shots=4)
    a = RunConfig(**base, model=str(tiny_model_dir))
    copy = tmp_path / "elsewhere" / tiny_model_dir.name
    shutil.copytree(tiny_model_dir, copy)
    assert a.hash() == RunConfig(**base, model=str(copy)).hash()
    assert a.identity()["model"]["folder"] == tiny_model_dir.name
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert a.hash() != RunConfig(**base, model=str(copy)).hash()
    assert RunConfig(**base).identity()["model"] == "smollm2-135m"  # a bundled name stays as given


def test_predict_uses_a_saved_model(recorded, tmp_path, capsys):
    from conftest import Case
    from fewtune import saving
    run = recorded(Case("pbft", "pbft", {}))
    rows = [{"text": text} for text, _ in toy_rows(5, offset=300)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--model-dir", str(run.saved), "--input", str(src), "-o", str(out), "--device", "cpu"]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["text"] for p in preds] == [r["text"] for r in rows]
    expected = saving.predict(run.saved, rows, "cpu")
    assert [p["label"] for p in preds] == [e["label"] for e in expected]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)
    text_input = tmp_path / "in.txt"
    text_input.write_text("\n".join(r["text"] for r in rows) + "\n")
    assert main(["predict", "--model-dir", str(run.saved), "--input", str(text_input), "--device", "cpu"]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == [e["label"] for e in expected]
    assert "no fewtune.json" in one_line_error(capsys, ["predict", "--model-dir", str(tmp_path), "--input", str(src)])


# ----------------------------------------------------------------------------- bad inputs
def user_task(tmp_path, *, toml=TOY_TASK, train=None, dev=None, replace=()) -> list[str]:
    """A user task file and its data under tmp_path; returns the --task/--data-root arguments."""
    for old, new in replace:
        assert old in toml, old
        toml = toml.replace(old, new)
    write_tsv(tmp_path / "toy" / "train.tsv", ("text", "label"), train if train is not None else toy_rows(40))
    write_tsv(tmp_path / "toy" / "dev.tsv", ("text", "label"), dev if dev is not None else toy_rows(12, offset=100))
    write_tsv(tmp_path / "toy" / "ood.tsv", ("text", "label"), toy_rows(12, offset=200))
    (tmp_path / "task.toml").write_text(toml)
    return ["--task", str(tmp_path / "task.toml"), "--data-root", str(tmp_path)]


def run_args(model_dir, task_args, *extra):
    return ["run", *task_args, "--model", str(model_dir), "--shots", "4", "--eval-limit", "4", "--epochs", "1",
            "--dtype", "fp32", "--device", "cpu", "-q", *extra]


BAD = {
    # id: (lambda tmp_path, toy, model -> argv, words the one line must contain)
    "unknown task": (lambda tmp, toy, m: ["run", "--task", "mnly"], ["Unknown task 'mnly'", "Did you mean: mnli"]),
    "unknown method": (lambda tmp, toy, m: ["run", "--method", "lorra"], ["Unknown method 'lorra'", "Did you mean: lora"]),
    "unknown model": (lambda tmp, toy, m: run_args("smollm2-136m", user_task(tmp), "--method", "icl"),
                      ["Unknown model 'smollm2-136m'", "Did you mean: smollm2-135m"]),
    "missing data file": (lambda tmp, toy, m: run_args(m, user_task(tmp, replace=[("toy/dev.tsv", "toy/missing.tsv")])),
                          ["toy/missing.tsv does not exist"]),
    "empty data root": (lambda tmp, toy, m: run_args(m, ["--task", "cola", "--data-root", str(tmp)]),
                        ["cola/in_domain_train.tsv does not exist", "--data-source hub"]),
    "data root not a folder": (lambda tmp, toy, m: run_args(m, ["--task", "cola", "--data-root", str(tmp / "nope")]),
                               ["Data folder", "nope does not exist"]),
    "malformed row": (lambda tmp, toy, m: run_args(m, user_task(tmp, train=toy_rows(3) + [("a", "b", "1")] + toy_rows(4))),
                      ["train.tsv line 5", "malformed row", "expected 2 columns, found 3"]),
    "label outside mapping": (lambda tmp, toy, m: run_args(m, user_task(tmp, dev=toy_rows(2) + [("odd one", "7")])),
                              ["dev.tsv line 4", "label '7'"]),
    "empty split": (lambda tmp, toy, m: run_args(m, user_task(tmp, dev=[])), ["split 'dev' is empty"]),
    "too many shots": (lambda tmp, toy, m: run_args(m, user_task(tmp)) + ["--shots", "100"],
                       ["--shots 100 needs 50 examples of class 0", "has 20"]),
    "multi-token verbalizer": (lambda tmp, toy, m: run_args(m, user_task(tmp, replace=[('[" No", " Yes"]', '[" Yesterday-ish", " Yes"]')])),
                               ["' Yesterday-ish' is 4 tokens"]),
    "train layers > depth": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--method", "adaptive", "--train-layers", "9"),
                             ["--train-layers 9", "depth (4 blocks)"]),
    "context shots without few-shot": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--method", "cd", "--context-shots", "2"),
                                       ["--context-shots", "--context few-shot"]),
    "train layers with pbft": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--method", "pbft", "--train-layers", "2"),
                               ["--train-layers applies to method(s) adaptive, not 'pbft'"]),
    "lora targets not in model": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--method", "lora", "--lora-targets", "query,value"),
                                  ["LoRA target module(s) ['query', 'value'] not found", "q_proj"]),
    "unknown key in task file": (lambda tmp, toy, m: run_args(m, user_task(tmp, replace=[("labels =", "lables =")])),
                                 ["task.toml: unknown key 'lables'", "Did you mean: labels"]),
    "invalid toml": (lambda tmp, toy, m: run_args(m, user_task(tmp, replace=[('name = "toy"', 'name = "toy')])),
                     ["task.toml is not valid TOML"]),
    "bad integer": (lambda tmp, toy, m: ["run", "--shots", "abc"], ["--shots", "invalid int value: 'abc'"]),
    "unknown flag": (lambda tmp, toy, m: ["run", "--shotz", "3"], ["unrecognized arguments: --shotz"]),
    "fp16": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--dtype", "fp16"), ["'dtype'", "fp16"]),
    "pattern index": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--pattern", "7"), ["--pattern 7 does not exist"]),
    "eval split": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--eval-splits", "dev,tset"), ["no split 'tset'"]),
    "zero shots training": (lambda tmp, toy, m: run_args(m, user_task(tmp), "--method", "ft", "--shots", "0"), ["needs --shots ≥ 1"]),
    "output folder": (lambda tmp, toy, m: run_args(m, user_task(tmp), "-o", str(tmp / "no" / "r.json")), ["--output", "does not exist"]),
    "config file missing": (lambda tmp, toy, m: ["run", "--config", str(tmp / "c.toml")], ["Config file", "c.toml does not exist"]),
    "config unknown field": (lambda tmp, toy, m: ["run", "--config", str(write_config(tmp, "shotz = 3\n"))],
                             ["unknown field 'shotz'", "Did you mean: shots"]),
    "method option typo": (lambda tmp, toy, m: ["run", "--config", str(write_config(tmp, 'method = "lora"\n[method_options]\nrank = 4\n'))],
                           ["Method 'lora' has no option 'rank'"]),
}


# probe, lpft and bitfit options out of range, and bitfit on a model with nothing it can train: one line naming the
# option, exit 2, and neither the result file nor the model folder written
OOD_BAD = {
    "probe c 0": (["--method", "probe", "--probe-c", "0"], ["probe: c (--probe-c", "must be a positive number"]),
    "probe c negative": (["--method", "probe", "--probe-c", "-0.5"], ["probe: c (--probe-c"]),
    "probe pooling": (["--method", "probe", "--pooling", "max"], ["probe: pooling (--pooling) must be last or mean"]),
    "probe max iter 0": (["--method", "probe", "--probe-max-iter", "0"], ["probe: max_iter (--probe-max-iter"]),
    "lpft lp budget 0": (["--method", "lpft", "--probe-max-iter", "0"], ["lpft: max_iter (--probe-max-iter"]),
    "lpft ft budget 0": (["--method", "lpft", "--epochs", "0"], ["'epochs' must be a positive integer"]),
    "lpft c negative": (["--method", "lpft", "--probe-c", "-1"], ["lpft: c (--probe-c"]),
    "bitfit params": (["--method", "bitfit", "--bitfit-params", "weights"], ["bitfit: params (--bitfit-params)"]),
    "bitfit without biases": (["--method", "bitfit"], ["bitfit: LlamaForCausalLM has no bias terms",
                                                       "--bitfit-params norm trains its normalisation weights"]),
    "probe flag on ft": (["--method", "ft", "--probe-c", "2"], ["--probe-c applies to method(s) lpft, probe"]),
}


@pytest.mark.parametrize("case", list(OOD_BAD), ids=list(OOD_BAD))
def test_bad_probe_lpft_bitfit_options_write_nothing(case, tmp_path, tiny_model_dir, capsys):
    argv, words = OOD_BAD[case]
    out, saved = tmp_path / "r.json", tmp_path / "saved"
    line = one_line_error(capsys, run_args(tiny_model_dir, user_task(tmp_path), *argv, "-o", str(out),
                                           "--save-model", str(saved)))
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    assert not out.exists() and not saved.exists()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_error(case, tmp_path, toy, tiny_model_dir, capsys):
    build, words = BAD[case]
    line = one_line_error(capsys, build(tmp_path, toy, tiny_model_dir))
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"


def test_icl_save_model_keeps_the_demonstrations(toy, tiny_model_dir, tmp_path):
    """icl --save-model saves its demonstrations and the base model's name (no copy of the weights); predict scores
    new text after them exactly as the run scored its evaluation examples."""
    import numpy as np
    saved, out = tmp_path / "icl-model", tmp_path / "r.json"
    assert main(tiny_args(toy, tiny_model_dir, "--method", "icl", "--save-model", str(saved), "-o", str(out))) == 0
    manifest = json.loads((saved / "fewtune.json").read_text())
    assert manifest["weights"] is False and manifest["prefix"].count("Answer:") == 4 and manifest["base_model"]
    assert not list(saved.glob("*.safetensors"))
    result = json.loads(out.read_text())
    from fewtune import saving
    dev = load_split(load_task(str(toy.task_file)), "dev", toy.root)
    stored = result["predictions"]["dev"]
    rows = [{"text": dev[i].fields["text"]} for i in stored["idx"]]
    preds = saving.predict(saved, rows, "cpu")
    probs = np.array([[p["probabilities"][k] for k in ("negative", "positive")] for p in preds])
    assert np.allclose(probs, np.exp(np.array(stored["logprobs"])), atol=1e-4)


@pytest.mark.parametrize("argv", [["report", "--help"], ["results"], ["report"], ["ls", "tasks"], ["ls", "models"]])
def test_commands_that_load_no_model_import_no_torch(argv, tmp_path):
    """The registries load lazily: reading results or listing tasks and models imports neither torch nor
    transformers (they cost ~2 s a command)."""
    import json
    import subprocess
    import sys
    db = tmp_path / "fewtune.db"
    script = ("import json, sys\nfrom fewtune.cli import main\n"
              f"try:\n    main({[*argv, *(['--db', str(db)] if argv[0] in ('results', 'report') and '--help' not in argv else [])]!r})\n"
              "except SystemExit:\n    pass\n"
              "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'fewtune.methods.base')}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"torch": False, "transformers": False, "fewtune.methods.base": False}, done.stderr[-2000:]

"""Every input means what it says: method flags reach the options they name, task and data files are read as
written, the label word is the token the model sees, each method uses what it is given (adaptive's layers, icl's
truncation, cd's teacher context, evaluation on the training split), and errors give the right advice."""

from __future__ import annotations

import pytest
from conftest import make_tiny_lm

from fewtune.cli import build_parser, config_from_args, main
from fewtune.errors import FewtuneError
from fewtune.methods import get_method


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fewtune: error:"), err
    return lines[0]


# ----------------------------------------------------------------------------- 7: cd's LoRA student from the CLI
def test_cd_lora_student_rank_and_alpha_from_flags(tokenizer):
    args = build_parser().parse_args(["run", "--method", "cd", "--student", "lora", "--lora-r", "4", "--lora-alpha", "8"])
    cfg = config_from_args(args)
    assert cfg.method_options == {"student": "lora", "lora_r": 4, "lora_alpha": 8}
    model = get_method("cd", cfg.method_options).prepare(None, make_tiny_lm(tokenizer))
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha) == (4, 8)


def test_lora_flags_still_map_to_lora_options():
    cfg = config_from_args(build_parser().parse_args(["run", "--method", "lora", "--lora-r", "4", "--lora-alpha", "8"]))
    assert cfg.method_options == {"r": 4, "alpha": 8}


@pytest.mark.parametrize("argv, words", [
    (["run", "--method", "cd", "--lora-r", "4"], ["only with --student lora"]),
    (["run", "--method", "cd", "--student", "lora", "--lora-r", "0"], ["lora: r must be a positive integer"]),
    (["run", "--method", "pbft", "--lora-r", "4"], ["--lora-r applies to method(s) lora, cd, not 'pbft'"]),
])
def test_cd_lora_flags_bad(capsys, argv, words):
    line = one_line_error(capsys, argv)
    for w in words:
        assert w in line, line


# ----------------------------------------------------------------------------- 11: the console line shows the task's metrics
def _result(metrics: dict) -> dict:
    return {"evals": {"dev": {"role": "in_domain", **metrics, "n": 10, "confusion": [[5, 0], [0, 5]]}},
            "config": {"method": "icl", "task": "toy", "shots": 4, "seed": 0},
            "cost": {"train_seconds": 0.0, "eval_seconds": 1.0, "peak_memory_mib": 100.0}}


def test_summary_line_shows_every_listed_metric():
    from fewtune.runner import summary_line
    line = summary_line(_result({"accuracy": 0.5, "macro_f1": 0.4, "mcc": 0.1}))
    assert "acc 0.500" in line and "macro-F1 0.400" in line and "mcc 0.100" in line
    line = summary_line(_result({"macro_f1": 0.25}))  # a task that lists macro-F1 only
    assert "macro-F1 0.250" in line and "acc" not in line.split("|")[0].split(":", 1)[1]


def test_console_lines_show_the_primary_metric_and_the_task_name_not_its_path():
    from fewtune.runner import brief, summary_line
    r = _result({"accuracy": 0.7, "macro_f1": 0.6, "mcc": 0.12})
    r["config"]["task"] = "/home/me/tasks/sst2.toml"
    r["task"] = {"name": "sst2", "primary_metric": "mcc"}
    line = summary_line(r)
    assert "on sst2," in line and "/home/me" not in line
    assert line.index("mcc 0.120 (primary)") < line.index("acc 0.700")
    assert brief(r) == "sst2: dev mcc 0.120"


# ----------------------------------------------------------------------------- 12-15: data and task files
def _task(tmp_path, splits: dict, **top):
    from fewtune.tasks import task_from_dict
    raw = {"name": "t", "labels": ["no", "yes"], "fields": ["text"], "train": "train", "in_domain": "train",
           "patterns": [{"template": "{text}?", "verbalizer": [" No", " Yes"]}], "splits": splits, **top}
    return task_from_dict(raw, where=str(tmp_path / "t.toml"))


def _local(path="t/train.tsv", fmt="tsv", header=True, **extra):
    return {"local": {"path": path, "format": fmt, "header": header}, "columns": {"text": "text", "label": "label"}, **extra}


def test_missing_file_without_hub_entry_does_not_advise_the_hub(tmp_path):
    from fewtune.data import load_split
    task = _task(tmp_path, {"train": _local(label_map={"0": "no", "1": "yes"})})
    with pytest.raises(FewtuneError) as e:
        load_split(task, "train", tmp_path)
    assert "does not exist" in str(e.value) and "--data-source hub" not in str(e.value)
    assert "no Hub source" in str(e.value)
    with pytest.raises(FewtuneError, match=r"has no Hub source .* use --data-source local or auto"):
        load_split(task, "train", tmp_path, source="hub")
    # with a Hub entry the advice stays
    hub = _task(tmp_path, {"train": _local(label_map={"0": "no", "1": "yes"}, hub={"path": "x/y", "split": "train"})})
    with pytest.raises(FewtuneError, match="--data-source hub"):
        load_split(hub, "train", tmp_path)


@pytest.mark.parametrize("fmt, header, content, words", [
    ("jsonl", False, "", ["train.jsonl is empty", "0 bytes"]),
    ("tsv", False, "", ["train.tsv is empty", "0 bytes"]),
    ("tsv", True, "", ["train.tsv is empty", "expected a header row"]),
    ("csv", True, "\n\n", ["train.csv is empty", "only blank lines"]),
    ("tsv", True, "text\tlabel\n", ["split 'train' is empty", "header row but no data rows"]),
])
def test_empty_data_file_says_the_file_is_empty(tmp_path, fmt, header, content, words):
    from fewtune.data import load_split
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / f"train.{fmt}").write_text(content)
    task = _task(tmp_path, {"train": _local(f"t/train.{fmt}", fmt, header, label_map={"0": "no", "1": "yes"})})
    with pytest.raises(FewtuneError) as e:
        load_split(task, "train", tmp_path)
    assert "after label mapping" not in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("name, suggestion", [("f1", "macro_f1"), ("macro-f1", "macro_f1"), ("acc", "accuracy"), ("mcc_", "mcc")])
def test_unknown_metric_names_file_key_and_suggests(tmp_path, name, suggestion):
    with pytest.raises(FewtuneError) as e:
        _task(tmp_path, {"train": _local(label_map={"0": "no", "1": "yes"})}, metrics=["accuracy", name])
    msg = str(e.value)
    assert str(tmp_path / "t.toml") in msg and "'metrics'" in msg and f"'{name}'" in msg
    assert f"Did you mean: {suggestion}?" in msg


def test_label_map_is_optional_identity(tmp_path):
    from fewtune.data import load_split
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.tsv").write_text("text\tlabel\na\tyes\nb\tno\nc\tmaybe\n")
    task = _task(tmp_path, {"train": _local()})
    assert task.splits["train"].label_map == {"no": "no", "yes": "yes"}
    with pytest.raises(FewtuneError, match=r"line 4: label 'maybe' is not in the task's label_map"):
        load_split(task, "train", tmp_path)
    (tmp_path / "t" / "train.tsv").write_text("text\tlabel\na\tyes\nb\tno\n")
    assert [ex.label for ex in load_split(task, "train", tmp_path)] == [1, 0]


def test_out_of_domain_may_be_empty_or_left_out_but_not_a_string(tmp_path):
    splits = {"train": _local(label_map={"0": "no", "1": "yes"})}
    assert _task(tmp_path, splits).eval_splits == ("train",)
    assert _task(tmp_path, splits, out_of_domain=[]).out_of_domain == ()
    with pytest.raises(FewtuneError, match="'out_of_domain' must be a list of split names"):
        _task(tmp_path, splits, out_of_domain="train")


# ----------------------------------------------------------------------------- 1: the label word is the token the model sees
@pytest.mark.parametrize("prompt, words, ok, message", [
    ("The film was good.\\nAnswer:", [" No", " Yes"], True, None),
    ("The film was good.\\nAnswer:\\n", ["No", "Yes"], True, None),       # a newline then the word: as the model reads it
    ("The film was good. ?", [" No", " Yes"], True, None),
    ("The film was good.\\nAnswer:", ["No", "Yes"], False, r"with no space.*Answer:No' = \['Answer', ':', 'No'\].*Answer: No' = \['Answer', ':', 'ĠNo'\].*leading space"),
    ("The film was good.\\nAnswer: ", ["No", "Yes"], False, r"tokenizes as \['Answer', ':', 'ĠNo'\] \(the prompt alone: \['Answer', ':', 'Ġ'\]\).*move the trailing whitespace"),
    ("The film was good.\\nAnswer: ", [" No", " Yes"], True, None),  # two spaces, but the tokens are what the model reads
])
def test_verbalizer_checked_against_the_prompt(tokenizer, prompt, words, ok, message):
    from fewtune.engine.models import verbalizer_token_ids
    prompt = prompt.replace("\\n", "\n")
    plain = verbalizer_token_ids(tokenizer, words, "m")  # one token each: the old check passes every case
    if ok:
        assert verbalizer_token_ids(tokenizer, words, "m", [prompt]) == plain
    else:
        with pytest.raises(FewtuneError, match=message):
            verbalizer_token_ids(tokenizer, words, "m", [prompt])


def test_run_refuses_glued_verbalizer(tmp_path, toy, tiny_model_dir, capsys):
    text = toy.task_file.read_text().replace('verbalizer = [" No", " Yes"]', 'verbalizer = ["No", "Yes"]', 1)
    task = tmp_path / "glued.toml"
    task.write_text(text)
    line = one_line_error(capsys, ["run", "--task", str(task), "--data-root", str(toy.root), "--model", str(tiny_model_dir),
                                   "--shots", "2", "--eval-limit", "4", "--device", "cpu", "-q"])
    assert "Verbalizer word 'No' follows the prompt" in line and "leading space" in line


@pytest.mark.parametrize("name", ["cola", "mnli"])
def test_builtin_patterns_pass_the_answer_slot_check(tokenizer, name, data_dir):
    from fewtune.data import load_split
    from fewtune.engine.models import verbalizer_token_ids
    from fewtune.tasks import load_task
    task = load_task(name)
    examples = load_split(task, task.in_domain, data_dir)[:5]
    for pattern in task.patterns:
        verbalizer_token_ids(tokenizer, pattern.verbalizer, "smollm2-135m", [task.format(pattern, ex) for ex in examples])


# ----------------------------------------------------------------------------- 4: adaptive trains what follows the blocks
def _tiny(arch: str, head: bool = False):
    import torch
    import transformers as tf
    torch.manual_seed(0)
    V = 64
    cfgs = {
        "llama": (tf.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 num_key_value_heads=1, pad_token_id=0), "LlamaFor"),
        "gpt2": (tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=3, n_head=2, n_positions=32, pad_token_id=0), "GPT2"),
        "opt": (tf.OPTConfig(vocab_size=V, hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=3, ffn_dim=32,
                             num_attention_heads=2, max_position_embeddings=32, pad_token_id=0), "OPTFor"),
        "bloom": (tf.BloomConfig(vocab_size=V, hidden_size=16, n_layer=3, n_head=2, pad_token_id=0), "BloomFor"),
        "falcon": (tf.FalconConfig(vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, pad_token_id=0), "FalconFor"),
    }
    cfg, _ = cfgs[arch]
    cls = getattr(tf, {"llama": "Llama", "gpt2": "GPT2", "opt": "OPT", "bloom": "Bloom", "falcon": "Falcon"}[arch]
                  + ("ForSequenceClassification" if head else ("LMHeadModel" if arch == "gpt2" else "ForCausalLM")))
    if head:
        cfg.num_labels = 2
    return cls(cfg).eval()


@pytest.mark.parametrize("arch, after", [
    ("llama", {"model.norm.weight"}),
    ("gpt2", {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    ("opt", {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias", "model.decoder.project_out.weight"}),
    ("bloom", {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    ("falcon", {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
])
@pytest.mark.parametrize("objective", ["pbft", "ft"])
def test_adaptive_trains_everything_between_last_block_and_head(arch, after, objective):
    model = _tiny(arch, head=objective == "ft")
    method = get_method("adaptive", {"train_layers": 1, "objective": objective})
    method.prepare(None, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    top = {n for n in trainable if ".2." in n}
    heads = {n for n in trainable if n.split(".")[0] in ("score", "classifier")}
    assert top and trainable - top - heads == after
    assert (objective == "ft") == bool(heads)
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad  # embeddings (and the tied LM head) stay frozen
    if arch == "opt":
        assert not model.get_decoder().project_in.weight.requires_grad  # before the blocks: frozen


# ----------------------------------------------------------------------------- 5: one truncation rule for icl
def test_icl_truncates_queries_to_max_length_with_or_without_demonstrations(toy, tiny_model_dir):
    from conftest import Case, tiny_run_config

    from fewtune.runner import run
    counts = {}
    for shots in (0, 2):
        cfg = tiny_run_config(Case("icl", "icl", {}), toy, tiny_model_dir, shots=shots, max_length=8, eval_limit=4)
        result = run(cfg, progress=False)
        counts[shots] = {name: e["truncated_examples"] for name, e in result["evals"].items()}
        if shots:
            assert result["method_info"]["demonstrations_used"] == 2  # the demonstrations are not cut
    assert counts[0] == counts[2] == {"dev": 4, "ood": 4}  # every toy query is longer than 8 tokens


# ----------------------------------------------------------------------------- 2: the cd teacher's context fits the model
@pytest.fixture(scope="module")
def short_model_dir(tokenizer, tmp_path_factory):
    """A tiny Llama with 64 positions: four toy demonstrations (~20 tokens each) and a query do not fit."""
    folder = tmp_path_factory.mktemp("tiny-64")
    make_tiny_lm(tokenizer, max_position_embeddings=64).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_cd_teacher_context_drops_demonstrations_to_fit(toy, short_model_dir):
    from conftest import Case, tiny_run_config

    from fewtune.runner import run
    cfg = tiny_run_config(Case("cd", "cd", {"context": "few-shot", "context_shots": 4}), toy, short_model_dir,
                          shots=4, epochs=1, eval_limit=2)
    info = run(cfg, progress=False)["method_info"]
    used, dropped = info["context_demonstrations_used"], info["context_demonstrations_dropped"]
    assert 1 <= used < 4 and used + dropped == 4 and len(info["context_demonstration_indices"]) == used
    assert info["teacher_context_limit"] == 64 and info["teacher_context_tokens"] < 64


def test_cd_teacher_context_that_cannot_fit_is_refused(tmp_path, toy, short_model_dir, capsys):
    text = toy.task_file.read_text().replace('instruction = "Decide whether each review is positive."',
                                             'instruction = "' + "Decide whether each review is positive. " * 8 + '"')
    task = tmp_path / "long.toml"
    task.write_text(text)
    line = one_line_error(capsys, ["run", "--task", str(task), "--data-root", str(toy.root), "--model", str(short_model_dir),
                                   "--method", "cd", "--shots", "4", "--epochs", "1", "--eval-limit", "2", "--device", "cpu",
                                   "--dtype", "fp32", "-q"])
    assert "cd: the teacher's context" in line and "exceed the model's 64 positions" in line


# ----------------------------------------------------------------------------- 3: evaluating on the training split
@pytest.mark.parametrize("how", ["eval-splits", "in_domain"])
def test_eval_on_training_split_leaves_the_sample_out(tmp_path, toy, tiny_model_dir, how):
    from conftest import Case, tiny_run_config

    from fewtune.runner import run
    if how == "eval-splits":
        cfg = tiny_run_config(Case("icl", "icl", {}), toy, tiny_model_dir, shots=6, eval_limit=None, eval_splits=["train", "dev"])
    else:  # a task whose in-domain split is its training split
        task = tmp_path / "selfeval.toml"
        task.write_text(toy.task_file.read_text().replace('in_domain = "dev"', 'in_domain = "train"'))
        cfg = tiny_run_config(Case("icl", "icl", {}), toy, tiny_model_dir, shots=6, eval_limit=None, task=str(task))
    result = run(cfg, progress=False)
    train = result["evals"]["train"]
    assert train["excluded_train_examples"] == 6 and train["n"] == 40 - 6
    assert "excluded_train_examples" not in result["evals"]["ood"] if how == "in_domain" else "excluded_train_examples" not in result["evals"]["dev"]
    assert len(result["method_info"]["demonstration_indices"]) == 6


def test_exclusion_uses_row_ids_and_refuses_an_empty_remainder(toy):
    from fewtune.data import exclude_training, load_split
    from fewtune.tasks import load_task
    task = load_task(str(toy.task_file))
    train = load_split(task, "train", toy.root)
    kept, n = exclude_training(task, "train", train[:10], train[5:8])
    assert n == 3 and [ex.idx for ex in kept] == [0, 1, 2, 3, 4, 8, 9]
    assert exclude_training(task, "dev", train[:10], train[5:8]) == (train[:10], 0)
    with pytest.raises(FewtuneError, match="nothing is left"):
        exclude_training(task, "train", train[:3], train[:3])


# ----------------------------------------------------------------------------- 6: a result another grid took over
def test_grid_reports_a_result_it_could_not_record(tmp_path):
    from fewtune.grid import expand, run_grid
    from fewtune.store import Store
    grid = expand({"models": ["fake-model"], "tasks": ["cola"], "shots": [2], "seeds": [0, 1], "eval_limit": 10,
                   "methods": [{"method": "icl"}]}, default_name="two")
    db = tmp_path / "r.db"
    other = {"host": "elsewhere", "pid": 1, "started": 0.0}  # another grid that --reclaim'ed the first cell

    def runner(cfg, progress=False):
        if cfg.hash() == grid.cells[0].key:
            with Store(db) as s2:
                assert s2.claim(cfg, owner=other, reclaim=True) == "claimed"
        return {"config": cfg.to_dict(), "evals": {"dev": {"accuracy": 0.5, "n": 10}}, "cost": {}, "versions": {}}

    lines = []
    with Store(db) as store:
        s = run_grid(grid, store, tmp_path / "logs", runner=runner, in_process=True, progress=False, echo=lines.append)
        rows = {r["config_hash"]: r for r in store.rows()}
    assert (s.success, s.lost, s.failed) == (1, 1, 0)
    assert any(line.startswith("NOT RECORDED") and "another grid took this cell over" in line for line in lines)
    assert not any(line.startswith("ok") and grid.cells[0].describe() in line for line in lines)
    assert rows[grid.cells[0].key]["status"] == "running" and rows[grid.cells[1].key]["status"] == "success"


# ----------------------------------------------------------------------------- 17: --shots-per-class
def _cfg(*argv):
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_shots_per_class_is_recorded_as_the_total(toy, tmp_path):
    per_class = _cfg("--task", "cola", "--method", "icl", "--shots-per-class", "8")
    total = _cfg("--task", "cola", "--method", "icl", "--shots", "16")
    assert per_class.shots == 16 and per_class.hash() == total.hash() and per_class.to_dict() == total.to_dict()
    three = tmp_path / "three.toml"  # a three-label task: 3 x 4
    three.write_text(toy.task_file.read_text().replace('labels = ["negative", "positive"]', 'labels = ["negative", "positive", "mixed"]')
                     .replace('verbalizer = [" No", " Yes"]', 'verbalizer = [" No", " Yes", " Maybe"]'))
    assert _cfg("--task", str(three), "--shots-per-class", "4").shots == 12
    conf = tmp_path / "c.toml"
    conf.write_text('task = "mnli"\nshots_per_class = 2\n')
    assert _cfg("--config", str(conf)).shots == 4
    assert _cfg("--config", str(conf), "--shots", "6").shots == 6  # a flag overrides the file


@pytest.mark.parametrize("argv, words", [
    (["run", "--shots", "4", "--shots-per-class", "2"], ["--shots and --shots-per-class both given", "total"]),
    (["run", "--shots-per-class", "-1"], ["--shots-per-class must be an integer ≥ 0"]),
])
def test_shots_per_class_bad(capsys, argv, words):
    line = one_line_error(capsys, argv)
    for w in words:
        assert w in line, line


def test_grid_shots_per_class(tmp_path):
    from fewtune.grid import expand
    spec = {"models": ["m"], "tasks": ["cola"], "seeds": [0], "shots_per_class": [2, 8],
            "methods": [{"method": "icl"}, {"method": "pbft", "label": "pbft-total", "shots": [4]},
                        {"method": "lora", "shots_per_class": [1]}]}
    cells = expand(spec, validate=False).cells
    got = sorted((c.label, c.config.shots) for c in cells)
    assert got == [("icl", 4), ("icl", 16), ("lora", 2), ("pbft-total", 4)]
    total = {k: v for k, v in spec.items() if k != "shots_per_class"} | {"shots": [4, 16], "methods": [{"method": "icl"}]}
    same = expand(total, validate=False)
    assert {c.key for c in same.cells} == {c.key for c in cells if c.label == "icl"}
    with pytest.raises(FewtuneError, match="'shots' and 'shots_per_class' both given"):
        expand({**spec, "shots": [4]}, validate=False)


# ----------------------------------------------------------------------------- 16: fewtune check, fewtune ls tasks
def test_check_validates_a_task_file_without_running(toy, tiny_model_dir, capsys):
    assert main(["check", str(toy.task_file), "--data-root", str(toy.root), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "task 'toy' v1" in out and "2 labels ['negative', 'positive']" in out
    assert "split train" in out and "40 examples (negative 20, positive 20)" in out
    assert "split dev" in out and "24 examples" in out and "out-of-domain" in out
    assert "up to 20 per class" in out and "pattern 1:" in out and "'ĠYes'" in out
    assert out.strip().endswith("is a valid task")


@pytest.mark.parametrize("edit, words", [
    (('verbalizer = [" No", " Yes"]', 'verbalizer = ["No", "Yes"]'), ["Verbalizer word 'No' follows the prompt"]),
    (('columns = { text = "text", label = "label" }', 'columns = { text = "review", label = "label" }'),
     ["column 'review' (for 'text') is not in the header"]),
    (('toy/ood.tsv', 'toy/nope.tsv'), ["nope.tsv does not exist"]),
])
def test_check_reports_the_first_problem(tmp_path, toy, tiny_model_dir, capsys, edit, words):
    task = tmp_path / "bad.toml"
    task.write_text(toy.task_file.read_text().replace(*edit, 1))
    line = one_line_error(capsys, ["check", str(task), "--data-root", str(toy.root), "--model", str(tiny_model_dir)])
    for w in words:
        assert w in line, line


def test_ls_tasks_lists_task_files_in_a_folder(tmp_path, toy, capsys, monkeypatch):
    (tmp_path / "sst2.toml").write_text(toy.task_file.read_text().replace('name = "toy"', 'name = "sst2"'))
    (tmp_path / "broken.toml").write_text(toy.task_file.read_text().replace("labels =", "lables ="))
    (tmp_path / "grid.toml").write_text('models = ["m"]\ntasks = ["cola"]\n')  # not a task file: not listed
    assert main(["ls", "tasks", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = [line.split()[0] for line in lines if line and not line.startswith("(")]
    assert first == ["cola", "mnli", str(tmp_path / "broken.toml"), str(tmp_path / "sst2.toml")]
    assert any("'sst2'" in line and "in-domain=dev" in line for line in lines)
    assert any("broken.toml" in line and "unknown key 'lables'" in line for line in lines)
    monkeypatch.chdir(tmp_path)  # without --dir: the current folder
    assert main(["ls", "tasks"]) == 0
    assert "sst2.toml" in capsys.readouterr().out
    assert "--dir lists task files" in one_line_error(capsys, ["ls", "models", "--dir", str(tmp_path)])
    assert "is not a folder" in one_line_error(capsys, ["ls", "tasks", "--dir", str(tmp_path / "nope")])


def test_grid_command_says_not_recorded_and_exits_1(tmp_path, monkeypatch, capsys):
    (tmp_path / "reclaiming_runner.py").write_text(
        "import os\nfrom fewtune.store import Store\n"
        "def run(cfg, progress=False):\n"
        "    if cfg.seed == 0:  # meanwhile another grid --reclaim's this cell\n"
        "        with Store(os.environ['RECLAIM_DB']) as s:\n"
        "            s.claim(cfg, owner={'host': 'elsewhere', 'pid': 1, 'started': 0.0}, reclaim=True)\n"
        "    return {'config': cfg.to_dict(), 'evals': {'dev': {'accuracy': 0.5, 'n': 4}}, 'cost': {}, 'versions': {}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", "reclaiming_runner:run")
    db = tmp_path / "r.db"
    monkeypatch.setenv("RECLAIM_DB", str(db))
    spec = tmp_path / "g.toml"
    spec.write_text('models = ["m"]\ntasks = ["cola"]\nshots = [2]\nseeds = [0, 1]\n[[methods]]\nmethod = "icl"\n')
    rc = main(["grid", str(spec), "--db", str(db), "--in-process", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "1 succeeded now, 0 failed, 1 finished but not recorded" in captured.out
    assert "NOT RECORDED" in captured.err

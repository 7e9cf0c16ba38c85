"""Tasks as data: the built-in TOML files and the checks on a user's task file."""

from __future__ import annotations

import copy

import pytest

from fewtune.data import Example
from fewtune.engine import models
from fewtune.errors import FewtuneError
from fewtune.tasks import DROP, builtin_names, load_task, parse_task_file, task_from_dict

BUILTINS = ["cola", "mnli"]


def test_builtin_names():
    assert builtin_names() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_task_is_consistent(name, tokenizer):
    task = load_task(name)
    assert task.name == name and task.source.endswith(f"{name}.toml")
    assert task.eval_splits == (task.in_domain, *task.out_of_domain) and task.out_of_domain
    for split in (task.train, *task.eval_splits):
        assert split in task.splits and task.splits[split].local is not None
    for pattern in task.patterns:
        ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer, "smollm2-135m")  # one token each
        assert len(set(ids)) == len(task.labels)
        assert all(w.startswith(" ") for w in pattern.verbalizer)  # the leading-space footgun
        for f in task.fields:
            assert "{" + f + "}" in pattern.template


def test_mnli_maps_neutral_to_drop_and_contradiction_to_non_entailment():
    task = load_task("mnli")
    for split in ("train", "dev_matched"):
        lm = task.splits[split].label_map
        assert lm == {"entailment": "entailment", "contradiction": "non-entailment", "neutral": DROP}
    assert task.splits["hans"].group_by == ("heuristic",)
    assert task.labels == ("entailment", "non-entailment")


def test_format_and_raw_text():
    task = load_task("mnli")
    ex = Example(idx=0, fields={"premise": "A man sleeps.", "hypothesis": "A man is awake."}, label=1)
    assert task.format(task.patterns[0], ex) == "A man sleeps. Question: A man is awake. Yes or No? Answer:"
    assert task.raw_text(ex) == "A man sleeps.\nA man is awake."
    assert task.pattern(2) is task.patterns[2]
    with pytest.raises(FewtuneError, match="--pattern 3 does not exist"):
        task.pattern(3)


def test_unknown_task_suggests_the_closest():
    with pytest.raises(FewtuneError, match=r"Unknown task 'mnly'\. Did you mean: mnli\?"):
        load_task("mnly")
    with pytest.raises(FewtuneError, match="does not exist"):
        load_task("no/such/task.toml")


def test_verbalizer_word_must_be_one_token(tokenizer):
    with pytest.raises(FewtuneError, match=r"' Yesterday-ish' is 4 tokens"):
        models.verbalizer_token_ids(tokenizer, [" Yes", " Yesterday-ish"], "smollm2-135m")


# ----------------------------------------------------------------------------- checks on a task file
BASE = {
    "name": "t", "labels": ["no", "yes"], "fields": ["a", "b"], "train": "train", "in_domain": "dev",
    "patterns": [{"template": "{a} / {b}?", "verbalizer": [" No", " Yes"]}],
    "splits": {
        "train": {"local": {"path": "t/train.tsv"}, "columns": {"a": "a", "b": "b", "label": "y"}, "label_map": {"0": "no", "1": "yes"}},
        "dev": {"local": {"path": "t/dev.tsv"}, "columns": {"a": 0, "b": 1, "label": 2}, "label_map": {"0": "no", "1": "yes"}},
    },
}


def edited(path, value):
    raw = copy.deepcopy(BASE)
    *parents, last = path
    d = raw
    for key in parents:
        d = d[key]
    if value is DELETE:
        del d[last]
    else:
        d[last] = value
    return raw


DELETE = object()


def test_base_task_is_valid():
    task = task_from_dict(copy.deepcopy(BASE))
    assert task.fields == ("a", "b") and task.metrics == ("accuracy", "macro_f1", "mcc") and task.version == 1


@pytest.mark.parametrize("path, value, message", [
    (("lables",), ["x", "y"], r"unknown key 'lables'\. Did you mean: labels\?"),
    (("labels",), DELETE, r"missing key 'labels'"),
    (("labels",), ["only"], r"at least two distinct classes"),
    (("fields",), "a", r"'fields' must be list"),
    (("metrics",), ["f1"], r"Unknown metric 'f1'"),
    (("patterns", 0, "template"), "{a} {c}", r"template uses \{c\}"),
    (("patterns", 0, "template"), "{a}?", r"does not use field\(s\) \['b'\]"),
    (("patterns", 0, "template"), "{a} {b} {", r"malformed"),
    (("patterns", 0, "verbalizer"), [" No"], r"verbalizer has 1 words for 2 labels"),
    (("patterns", 0, "verbalizer"), [" No", " No"], r"verbalizer words must differ"),
    (("patterns", 0, "verbaliser"), [" No", " Yes"], r"unknown key 'verbaliser'\. Did you mean: verbalizer\?"),
    (("patterns",), [], r"at least one pattern"),
    (("in_domain",), "valid", r"in_domain split 'valid' is not declared"),
    (("splits", "train", "label_map", "2"), "maybe", r"'2' maps to 'maybe', which is not one of the labels"),
    (("splits", "train", "columns", "b"), DELETE, r"columns: missing 'b'"),
    (("splits", "train", "local", "format"), "xlsx", r"format 'xlsx' is not one of tsv, csv, jsonl"),
    (("splits", "train", "local", "pth"), "x", r"unknown key 'pth'\. Did you mean: path\?"),
    (("splits", "train", "local"), DELETE, r"needs 'local'"),
    (("version",), "2", r"'version' must be an integer"),
    (("equivalence_margin",), -0.1, r"my.toml: 'equivalence_margin' must be > 0 and at most 1"),
    (("equivalence_margin",), "0.05", r"my.toml: 'equivalence_margin' must be a number"),
    (("equivalence_margin",), 1.5, r"'equivalence_margin' must be > 0 and at most 1 \(the range of accuracy\)"),
    (("equivalence_margin",), float("nan"), r"'equivalence_margin' must be > 0"),
])
def test_bad_task_files_name_the_key(path, value, message):
    with pytest.raises(FewtuneError, match=message):
        task_from_dict(edited(path, value), where="my.toml")


def test_task_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "t"\nlabels = ["a", "b"\n')
    with pytest.raises(FewtuneError, match=r"bad.toml is not valid TOML"):
        parse_task_file(bad)
    unknown_key = tmp_path / "typo.toml"
    unknown_key.write_text('name = "t"\ndescripton = "x"\n')
    with pytest.raises(FewtuneError, match=r"typo.toml: unknown key 'descripton'\. Did you mean: description\?"):
        load_task(str(unknown_key))


def test_user_task_file_round_trip(toy):
    task = load_task(str(toy.task_file))
    assert task.name == "toy" and task.source == str(toy.task_file)
    assert task.out_of_domain == ("ood",) and len(task.patterns) == 2


def test_primary_metric_is_the_tasks_own(toy, tmp_path):
    assert load_task("cola").primary_metric == "mcc" and load_task("mnli").primary_metric == "accuracy"
    assert load_task(str(toy.task_file)).primary_metric == "accuracy"  # the default
    text = toy.task_file.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('metrics = [', 'primary_metric = "f1"\nmetrics = ['))
    with pytest.raises(FewtuneError, match=r"bad.toml: primary_metric 'f1' is not a metric .*Did you mean: mcc|macro_f1"):
        load_task(str(bad))
    ok = tmp_path / "ok.toml"
    ok.write_text(text.replace('metrics = ["accuracy", "mcc", "macro_f1"]', 'metrics = ["accuracy"]\nprimary_metric = "mcc"'))
    assert load_task(str(ok)).metrics == ("accuracy", "mcc")  # the primary metric is always computed


def test_task_content_hash_ignores_layout_not_content(toy, tmp_path):
    text = toy.task_file.read_text()
    a = tmp_path / "a.toml"
    a.write_text("# a comment\n" + text)
    b = tmp_path / "b.toml"
    b.write_text(text.replace("Is this review positive?", "Is this review good?"))
    assert load_task(str(a)).sha256 == load_task(str(toy.task_file)).sha256 != load_task(str(b)).sha256


def test_equivalence_margin_is_analysis_not_identity(toy, tmp_path):
    """A margin is fixed before the run and read by the analysis; setting it does not make finished runs another
    experiment (the task's content hash, part of every run's identity, leaves it out)."""
    text = toy.task_file.read_text()
    with_margin = tmp_path / "m.toml"
    with_margin.write_text(text.replace('metrics = [', 'equivalence_margin = 0.04\nmetrics = ['))
    task = load_task(str(with_margin))
    assert task.equivalence_margin == 0.04 and load_task(str(toy.task_file)).equivalence_margin is None
    assert task.sha256 == load_task(str(toy.task_file)).sha256
    assert load_task("cola").equivalence_margin == 0.05  # MCC ranges over 2: margins up to 2 are allowed there
    mcc = tmp_path / "mcc.toml"
    mcc.write_text(text.replace('metrics = [', 'primary_metric = "mcc"\nequivalence_margin = 1.5\nmetrics = ['))
    assert load_task(str(mcc)).equivalence_margin == 1.5


def test_hub_cola_has_no_in_domain_split():
    """GLUE's CoLA validation split mixes in-domain and out-of-domain dev: the task must not call it in_domain_dev."""
    from fewtune.data import load_split
    task = load_task("cola")
    assert task.splits["in_domain_dev"].hub is None and task.splits["out_of_domain_dev"].hub is None
    for split in ("in_domain_dev", "out_of_domain_dev"):
        with pytest.raises(FewtuneError, match=r"no Hub source \(.*(mixes in-domain and out-of-domain dev|mixes it with in-domain dev).*local files"):
            load_split(task, split, source="hub")

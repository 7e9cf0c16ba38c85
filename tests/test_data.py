"""Reading splits (the real files in ../shared/data and small files under tmp), binarising, sampling."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from conftest import write_tsv

from fewtune.data import Example, eval_subsample, label_counts, load_split, sample_train
from fewtune.errors import FewtuneError
from fewtune.tasks import load_task, task_from_dict


def raw_rows(path, header=True):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return (rows[0], rows[1:]) if header else (None, rows)


# ----------------------------------------------------------------------------- the real data
@pytest.fixture(scope="module")
def mnli():
    return load_task("mnli")


@pytest.fixture(scope="module")
def mnli_train(mnli, data_dir):
    return load_split(mnli, "train", data_dir)


@pytest.mark.parametrize("split, file, rows, neutral", [
    ("train", "mnli/train.tsv", 10_471, 3_470),
    ("dev_matched", "mnli/dev_matched.tsv", 9_815, 3_123),
])
def test_mnli_is_binarised(mnli, data_dir, split, file, rows, neutral):
    """Neutral dropped, contradiction -> non-entailment; every example traces back to its raw row."""
    header, raw = raw_rows(data_dir / file)
    gold = [dict(zip(header, r))["gold_label"] for r in raw]
    assert len(raw) == rows and gold.count("neutral") == neutral
    examples = load_split(mnli, split, data_dir)
    assert len(examples) == rows - neutral
    expected = {"entailment": mnli.labels.index("entailment"), "contradiction": mnli.labels.index("non-entailment")}
    for ex in examples:
        row = dict(zip(header, raw[ex.idx]))
        assert row["gold_label"] != "neutral"
        assert ex.label == expected[row["gold_label"]]
        assert ex.fields == {"premise": row["sentence1"].strip(), "hypothesis": row["sentence2"].strip()}
    assert label_counts(examples) == {0: gold.count("entailment"), 1: gold.count("contradiction")}


def test_hans_groups_are_parsed(mnli, data_dir):
    hans = load_split(mnli, "hans", data_dir)
    assert len(hans) == 30_000
    assert Counter(ex.groups["heuristic"] for ex in hans) == {"lexical_overlap": 10_000, "subsequence": 10_000,
                                                              "constituent": 10_000}
    assert label_counts(hans) == {0: 15_000, 1: 15_000}
    header, raw = raw_rows(data_dir / "hans" / "heuristics_evaluation_set.txt")
    for ex in hans[::997]:
        row = dict(zip(header, raw[ex.idx]))
        assert (ex.groups["heuristic"], mnli.labels[ex.label], ex.fields["premise"]) == \
            (row["heuristic"], row["gold_label"], row["sentence1"])


@pytest.mark.parametrize("split, n, counts", [
    ("train", 8_551, {0: 2_528, 1: 6_023}),
    ("in_domain_dev", 527, {0: 162, 1: 365}),
    ("out_of_domain_dev", 516, {0: 162, 1: 354}),
])
def test_cola_counts(data_dir, split, n, counts):
    cola = load_task("cola")
    examples = load_split(cola, split, data_dir)
    assert len(examples) == n and label_counts(examples) == counts
    _, raw = raw_rows(data_dir / cola.splits[split].local["path"], header=False)
    assert all(examples[i].fields["sentence"] == raw[i][3].strip() for i in range(0, n, 101))


def test_default_data_root_is_the_checkouts_shared_data(monkeypatch, tmp_path, data_dir):
    from fewtune.settings import data_root
    monkeypatch.delenv("FEWTUNE_DATA")
    monkeypatch.chdir(tmp_path)  # not next to ../shared: the fallback next to the source checkout is used
    assert data_root() == data_dir


# ----------------------------------------------------------------------------- the sampler
def synthetic(n_per_class=(30, 30)):
    labels = [label for label, n in enumerate(n_per_class) for _ in range(n)]
    return [Example(idx=i, fields={"text": f"{label}-{i}"}, label=label) for i, label in enumerate(labels)]


POOL = synthetic((40, 25))


def test_sampler_is_deterministic_and_seeded():
    assert sample_train(POOL, 16, seed=3, n_labels=2) == sample_train(POOL, 16, seed=3, n_labels=2)
    samples = {tuple(sample_train(POOL, 16, seed=s, n_labels=2)) for s in range(5)}
    assert len(samples) == 5


@pytest.mark.parametrize("shots", [2, 8, 15, 16, 32])
def test_sampler_is_class_balanced(shots):
    for seed in range(4):
        positions = sample_train(POOL, shots, seed, n_labels=2)
        counts = Counter(POOL[p].label for p in positions)
        assert len(positions) == len(set(positions)) == shots
        assert abs(counts[0] - counts[1]) <= shots % 2


def test_sampler_is_shuffled_not_grouped_by_class():
    orders = [[POOL[p].label for p in sample_train(POOL, 16, seed, 2)] for seed in range(5)]
    assert any(o != sorted(o) and o != sorted(o, reverse=True) for o in orders)


@pytest.mark.parametrize("small, large", [(16, 32), (8, 16), (15, 16), (4, 50)])
def test_smaller_sample_is_nested_in_larger(small, large):
    for seed in range(5):
        assert set(sample_train(POOL, small, seed, 2)) <= set(sample_train(POOL, large, seed, 2))
        assert set(sample_train(POOL, small, seed, 2, balanced=False)) <= set(sample_train(POOL, large, seed, 2, balanced=False))


def test_nesting_on_the_real_mnli_pool(mnli_train):
    for seed in range(3):
        assert set(sample_train(mnli_train, 16, seed, 2)) < set(sample_train(mnli_train, 32, seed, 2))


def test_uniform_option_follows_the_pool():
    skewed = synthetic((90, 10))
    uniform = [sample_train(skewed, 20, seed, 2, balanced=False) for seed in range(10)]
    balanced = [sample_train(skewed, 20, seed, 2) for seed in range(10)]
    minority = lambda samples: sum(skewed[p].label for s in samples for p in s) / sum(len(s) for s in samples)  # noqa: E731
    assert minority(balanced) == 0.5
    assert minority(uniform) < 0.3
    assert uniform[0] == sample_train(skewed, 20, 0, 2, balanced=False)


def test_sampler_errors():
    assert sample_train(POOL, 0, 0, 2) == []
    with pytest.raises(FewtuneError, match="class 1 but the training split has 25"):
        sample_train(POOL, 60, 0, 2)
    with pytest.raises(FewtuneError, match="more than the 65 training examples"):
        sample_train(POOL, 66, 0, 2, balanced=False)
    with pytest.raises(FewtuneError, match="shots"):
        sample_train(POOL, -1, 0, 2)


# ----------------------------------------------------------------------------- evaluation subsample
def test_eval_subsample_is_deterministic_stratified_and_in_data_order(mnli, data_dir):
    hans = load_split(mnli, "hans", data_dir)
    sub = eval_subsample(hans, 60)
    assert sub == eval_subsample(hans, 60)
    assert len(sub) == 60 and [ex.idx for ex in sub] == sorted(ex.idx for ex in sub)
    cells = Counter((ex.label, ex.groups["heuristic"]) for ex in sub)
    assert len(cells) == 6 and set(cells.values()) == {10}


@pytest.mark.parametrize("limit", [1, 7, 20, 33, 64])
def test_eval_subsample_quotas_are_proportional(limit):
    pool = synthetic((50, 15))
    sub = eval_subsample(pool, limit)
    assert len(sub) == limit and len({ex.idx for ex in sub}) == limit
    for label, n in ((0, 50), (1, 15)):
        quota = limit * n / len(pool)
        assert int(quota) <= sum(ex.label == label for ex in sub) <= int(quota) + 1


def test_eval_subsample_limits():
    assert eval_subsample(POOL, None) == POOL and eval_subsample(POOL, 1000) == POOL
    with pytest.raises(FewtuneError, match="eval-limit"):
        eval_subsample(POOL, 0)


# ----------------------------------------------------------------------------- user files and their errors
def tiny_task(path="t/train.tsv", fmt="tsv", header=True, columns=None):
    return task_from_dict({
        "name": "t", "labels": ["no", "yes"], "fields": ["text"], "train": "train", "in_domain": "train",
        "patterns": [{"template": "{text}?", "verbalizer": [" No", " Yes"]}],
        "splits": {"train": {"local": {"path": path, "format": fmt, "header": header},
                             "columns": columns or {"text": "text", "label": "label"},
                             "label_map": {"0": "no", "1": "yes", "x": "__drop__"}}},
    })


def test_reads_tsv_with_quotes_kept_and_blank_lines_skipped(tmp_path):
    write_tsv(tmp_path / "t" / "train.tsv", ("text", "label"), [('He said "hi"', "1"), ("drop me", "x"), ("  b  ", "0")])
    (tmp_path / "t" / "train.tsv").write_text((tmp_path / "t" / "train.tsv").read_text() + "\n\n")
    examples = load_split(tiny_task(), "train", tmp_path)
    assert [(ex.idx, ex.fields["text"], ex.label) for ex in examples] == [(0, 'He said "hi"', 1), (2, "b", 0)]


def test_reads_jsonl_and_csv(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    (tmp_path / "t" / "train.csv").write_text('text,label\n"a, with comma",1\nb,0\n')
    j = load_split(tiny_task("t/train.jsonl", "jsonl"), "train", tmp_path)
    c = load_split(tiny_task("t/train.csv", "csv"), "train", tmp_path)
    assert [(ex.fields["text"], ex.label) for ex in j] == [("a", 1), ("b", 0)]
    assert [(ex.fields["text"], ex.label) for ex in c] == [("a, with comma", 1), ("b", 0)]


@pytest.mark.parametrize("content, message", [
    ("text\tlabel\nfine\t1\ntoo\tmany\t0\n", r"train.tsv line 3: malformed row, expected 2 columns, found 3"),
    ("text\tlabel\nfine\t1\nodd\t7\n", r"train.tsv line 3: label '7' is not in the task's label_map"),
    ("text\tlabel\n", r"split 'train' is empty"),
    ("text\tlabel\nonly dropped\tx\n", r"split 'train' is empty"),
    ("", r"is empty \(expected a header row\)"),
    ("sentence\tlabel\nfine\t1\n", r"column 'text' \(for 'text'\) is not in the header"),
])
def test_bad_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.tsv").write_text(content)
    with pytest.raises(FewtuneError, match=message):
        load_split(tiny_task(), "train", tmp_path)


@pytest.mark.parametrize("fmt, content, line", [
    ("tsv", "text\tlabel\nfine\t1\nnul\x00inside\t0\n", 3),
    ("csv", "text,label\x00\nfine,1\n", 1),
    ("jsonl", '{"text": "a", "label": 1}\n\n{"text": "b\x00", "label": 0}\n', 3),
])
def test_a_nul_byte_is_refused_with_file_and_line(tmp_path, fmt, content, line):
    """A NUL byte (a binary, UTF-16 or damaged file) is a malformed row, not text read without a word."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / f"train.{fmt}").write_text(content)
    with pytest.raises(FewtuneError, match=rf"train.{fmt} line {line}: malformed row, it contains a NUL byte") as e:
        load_split(tiny_task(f"t/train.{fmt}", fmt), "train", tmp_path)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_jsonl(tmp_path):
    with pytest.raises(FewtuneError, match=r"t/train.tsv does not exist"):
        load_split(tiny_task(), "train", tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(FewtuneError, match=r"train.jsonl line 2: not valid JSON"):
        load_split(tiny_task("t/train.jsonl", "jsonl"), "train", tmp_path)


def test_a_named_data_root_missing_a_file_does_not_fall_back_to_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_network(*a, **k):
        raise AssertionError("went to the Hub")
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(FewtuneError, match=r"cola/in_domain_train.tsv does not exist"):
        load_split(load_task("cola"), "train", tmp_path)
    monkeypatch.setenv("FEWTUNE_DATA", str(tmp_path))
    with pytest.raises(FewtuneError, match=r"cola/in_domain_train.tsv does not exist"):
        load_split(load_task("cola"), "train")

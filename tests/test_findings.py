"""Findings files and their verdicts: each claim true, false or undecided by construction gets the right verdict;
with every option equal, the shipped study's family-wise false-verdict rate stays within 5%; a user's findings file
works end to end through `fewtune report --findings`; bad files are one-line errors."""

import json
import math
import re

import numpy as np
import pytest

from fewtune.cli import main
from fewtune.config import RunConfig
from fewtune.errors import FewtuneError
from fewtune.findings import check_against_labels, load_findings, parse_findings
from fewtune.findings.judge import (CONTRADICTED, NO_RUNS, NOT_JUDGED, NOT_SETTLED, SUPPORTED, half_width, holm, judge,
                                    one_sided_p)
from fewtune.stats import metrics
from fewtune.store import Store


def group(label: str, pred: np.ndarray, gold: np.ndarray, shots: int = 32, task: str = "mnli", model: str = "m",
          prefixes=("id", "ood"), population: int | None = None, seeds=None) -> dict:
    """An option as fewtune.stats.options.group_runs builds it, with only what the judge reads; the same predictions on
    both splits unless a dict {prefix: pred} is given."""
    g = {"task": task, "model": model, "label": label, "shots": shots, "examples_used": shots,
         "primary_metric": "accuracy", "preds": {}}
    for p in prefixes:
        pr = np.atleast_2d(pred[p] if isinstance(pred, dict) else pred)
        g["preds"][p] = {"seeds": list(seeds if seeds is not None else range(len(pr))), "idx": np.arange(len(gold)),
                         "gold": gold, "pred": pr, "n_classes": 2}
        g[f"{p}_split"] = "dev" if p == "id" else "ood-dev"
        g[f"{p}_population"] = population
    return g


def simulate(rng, accuracies: dict[str, float], seeds: int, n: int, tau: float = 0.3) -> tuple[np.ndarray, dict]:
    """Per option [seeds, n] predictions: example i is right with probability sigmoid(logit(acc) + seed shift +
    ease_i), the ease shared by every option (so options are paired by example), the shift by seed and option."""
    gold = (rng.random(n) < 0.5).astype(int)
    ease = rng.normal(0, 1.0, n)
    out = {}
    for label, acc in accuracies.items():
        shift = rng.normal(0, tau, (seeds, 1))
        p = 1 / (1 + np.exp(-(math.log(acc / (1 - acc)) + shift + ease)))
        right = rng.random((seeds, n)) < p
        out[label] = np.where(right, gold, 1 - gold)
    return gold, out


def claims_file(*claims: str) -> str:
    return "\n".join(f"[[claims]]\n{c}\n" for c in claims)


# ----------------------------------------------------------------------------- the statistics
def test_one_sided_p_inverts_the_bound():
    """At α = p the bound sits on the null: a larger α clears it, a smaller one does not."""
    dist, sv, ev, df = np.array([0.05, 0.1, 0.3]), 0.0009, 0.0004, 6.0
    p = one_sided_p(dist, sv, ev, df)
    assert np.all((p > 0) & (p < 0.5))
    assert np.allclose(half_width(p, sv, ev, df), dist, rtol=1e-6)
    assert np.all(np.diff(p) < 0)  # further from the null: smaller p
    assert one_sided_p(-0.1, sv, ev, df) == 1.0 and one_sided_p(0.1, math.nan, ev, df) == 1.0


def test_holm_by_hand():
    adjusted, divisor = holm([0.01, 0.04, 0.03, 0.5])
    assert np.allclose(adjusted, [0.04, 0.09, 0.09, 0.5]) and list(divisor) == [4, 2, 3, 1]


# ----------------------------------------------------------------------------- verdicts by construction
def test_every_verdict_right_by_construction():
    """Claims true, false and undecided by construction, judged together (Holm over all of them)."""
    rng = np.random.default_rng(0)
    gold, preds = simulate(rng, {"good": 0.85, "bad": 0.6, "same1": 0.75, "same2": 0.75}, seeds=6, n=1500, tau=0.1)
    groups = [group(k, v, gold) for k, v in preds.items()]
    gold2, preds2 = simulate(rng, {"close1": 0.7, "close2": 0.69}, seeds=2, n=60)
    groups += [group(k, v, gold2, task="small", population=80) for k, v in preds2.items()]
    groups.append(group("solo", np.atleast_2d(preds["good"][0]), gold, shots=16))  # one seed
    groups.append(group("other", preds["good"][:1] * 0 + 1, gold, shots=16))  # one seed
    f = parse_findings(json.loads(json.dumps({"claims": [
        dict(id="good-better", relation="better", a=["good"], b=["bad"], split="in_domain", shots=[32]),
        dict(id="bad-better", relation="better", a=["bad"], b=["good"], split="in_domain", shots=[32]),
        dict(id="bad-worse", relation="worse", a=["bad"], b=["good"], split="out_of_domain", shots=[32]),
        dict(id="same-equiv", relation="equivalent", a=["same1"], b=["same2"], split="in_domain", margin=0.1),
        dict(id="far-equiv", relation="equivalent", a=["good"], b=["bad"], split="in_domain", margin=0.05, shots=[32]),
        dict(id="same-noninf", relation="noninferior", a=["same*"], b=["good"], split="in_domain", margin=0.2,
             shots=[32]),
        dict(id="bad-noninf", relation="noninferior", a=["bad"], b=["good"], split="in_domain", margin=0.05,
             shots=[32]),
        dict(id="close", relation="better", a=["close1"], b=["close2"], split="in_domain"),
        dict(id="missing", relation="better", a=["lora"], b=["good"], split="in_domain", shots=[32]),
        dict(id="one-seed", relation="better", a=["solo"], b=["other"], split="in_domain"),
        dict(id="wide", relation="equivalent", a=["same1"], b=["same2"], split="in_domain", margin=1.5),
    ]})), "test.toml")
    j = judge(f, groups)
    got = {(r.claim.id, r.task): r for r in j.rows}
    expect = {"good-better": SUPPORTED, "bad-better": CONTRADICTED, "bad-worse": SUPPORTED,
              "same-equiv": SUPPORTED, "far-equiv": CONTRADICTED, "same-noninf": SUPPORTED,
              "bad-noninf": CONTRADICTED, "missing": NO_RUNS, "one-seed": NOT_SETTLED, "wide": NOT_JUDGED}
    for cid, verdict in expect.items():
        r = got[(cid, "mnli")]
        assert r.verdict == verdict, (cid, r.verdict, r.sentence())
    # same* is the mean of same1 and same2 (0.75) against good (0.85): −0.10, not worse by more than 0.2: holds
    close = got[("close", "small")]
    assert close.verdict == NOT_SETTLED and ("seeds" in close.needs or "examples" in close.needs)
    assert "no runs for lora" in got[("missing", "mnli")].sentence()
    assert "fewer than 4 seeds of solo" in got[("one-seed", "mnli")].sentence()
    # the claims that name no option of a task get a row there that says so, never an error
    assert got[("good-better", "small")].verdict == NO_RUNS
    # the interval shown is the one behind the verdict
    r = got[("good-better", "mnli")]
    assert r.lo > 0 and r.p_support <= 0.05 and 0.95 < r.level < 1
    r = got[("same-equiv", "mnli")]
    assert -0.1 < r.lo and r.hi < 0.1
    assert got[("bad-better", "mnli")].hi < 0  # contradicted: the interval (at C's level) clears the other side
    r = got[("far-equiv", "mnli")]
    assert r.lo > 0.05 and r.p_contra <= 0.05  # good − bad: shown above the margin
    assert "larger than the range of accuracy" in got[("wide", "mnli")].sentence()
    assert j.hypotheses == 2 * sum(x.judged for x in j.rows)


STUDY_LABELS = ("icl", "ft", "pbft", "adaptive", "lora", "cd-instruction", "cd-fewshot")  # the cpu grid's


def false_verdicts(j) -> list:
    """Rows whose verdict is false when every option is equal: 'better'/'worse' supported, or anything
    contradicted (equivalence and non-inferiority hold when the options are equal)."""
    return [r for r in j.rows if r.verdict == CONTRADICTED
            or (r.verdict == SUPPORTED and r.claim.relation in ("better", "worse"))]


def test_all_equal_family_wise_false_verdicts_within_5_percent():
    """The shipped study's five claims on the cpu grid's seven options, every option equal (a seed shift and a
    shared example ease, so pairing matters), both splits: at most 5% of 300 simulated result sets get any false
    verdict. 4-6 seeds, so the plans and the looks differ too (one look at 4 seeds, up to three at 6)."""
    f = load_findings("study")
    rng = np.random.default_rng(20)
    sims, bad, supported = 300, 0, 0
    for s in range(sims):
        seeds = 4 + s % 3
        gold, p_id = simulate(rng, dict.fromkeys(STUDY_LABELS, 0.7), seeds=seeds, n=100)
        _, p_ood = simulate(rng, dict.fromkeys(STUDY_LABELS, 0.7), seeds=seeds, n=100)
        j = judge(f, [group(lab, {"id": p_id[lab], "ood": p_ood[lab]}, gold) for lab in STUDY_LABELS])
        assert len(j.rows) == 5 and j.hypotheses == 10
        bad += bool(false_verdicts(j))
        supported += sum(r.verdict == SUPPORTED for r in j.rows)
    assert bad / sims <= 0.05, bad / sims
    assert supported > 0  # the equivalence claims, true here, are shown now and then: the test is not vacuous


# ----------------------------------------------------------------------------- a user's file, end to end
USER_FINDINGS = '''
title = "toy reviews: my two hypotheses"

[[claims]]
id = "lora-beats-icl"
statement = "LoRA beats prompting on my reviews."
relation = "better"
a = ["lora"]
b = ["icl"]
split = "in_domain"

[[claims]]
id = "lora-close-to-ft-ood"
relation = "equivalent"
a = ["lora"]
b = ["ft*"]
split = "out_of_domain"
margin = 0.2
'''


def store_toy_runs(path, task_file, data_root, accuracies: dict[str, float], seeds=(0, 1, 2, 3), n=120):
    """Synthetic results of the toy task (a user task given by path), stored as the runner stores them: per split
    metrics, baselines and per-example predictions; examples share an ease so options are paired."""
    rng = np.random.default_rng(5)
    labels = ["negative", "positive"]
    gold = np.array([0, 1] * (n // 2))
    ease = rng.normal(0, 1, n)
    with Store(path) as store:
        for seed in seeds:
            for label, acc in accuracies.items():
                cfg = RunConfig(task=str(task_file), data_root=str(data_root), model="m", method=label.rstrip("2"),
                                shots=4, seed=seed, eval_limit=n)
                evals, preds = {}, {}
                for role, split in (("in_domain", "dev"), ("out_of_domain", "ood")):
                    p = 1 / (1 + np.exp(-(math.log(acc / (1 - acc)) + ease + rng.normal(0, 0.2))))
                    pred = np.where(rng.random(n) < p, gold, 1 - gold)
                    logprobs = np.log(np.full((n, 2), 0.5))
                    evals[split] = {"role": role, "population": 500, **metrics.evaluation(
                        gold.tolist(), pred.tolist(), logprobs, labels, ("accuracy", "mcc", "macro_f1"))}
                    preds[split] = {"idx": list(range(n)), "gold": gold.tolist(), "pred": pred.tolist(),
                                    "logprobs": logprobs.tolist()}
                r = {"config": cfg.to_dict(), "identity": cfg.identity(), "examples_used": 4,
                     "task": {"name": "toy", "primary_metric": "accuracy", "labels": labels},
                     "evals": evals, "predictions": preds, "cost": {"train_seconds": 1.0, "peak_memory_mib": 100.0}}
                store.claim(cfg, label=label)
                assert store.finish(cfg.hash(), r)


def test_user_findings_end_to_end(tmp_path, toy, capsys):
    """Two claims on a user task, through `fewtune report --findings FILE` and `fewtune results --format json
    --findings FILE`: the section opens the report with a verdict per claim, the same in md, html and json."""
    db = tmp_path / "toy.db"
    store_toy_runs(db, toy.task_file, toy.root, {"icl": 0.6, "lora": 0.9, "ft": 0.88}, seeds=range(6))
    findings = tmp_path / "mine.toml"
    findings.write_text(USER_FINDINGS)
    out = tmp_path / "rep"
    assert main(["report", "--db", str(db), "--out", str(out), "--findings", str(findings)]) == 0
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    heading = "## Your findings on these results (toy reviews: my two hypotheses)"
    assert heading in md
    assert md.index(heading) < md.index("## Task toy")  # first, after the header
    rows = [line for line in md.splitlines() if line.startswith("| lora-")]
    assert len(rows) == 2
    assert "| supported |" in rows[0] and "toy / m" in rows[0]
    assert "lora-close-to-ft-ood" in rows[1] and "| supported |" in rows[1]
    assert "Supported: {lora} better than {icl}" in html
    capsys.readouterr()
    assert main(["results", "--db", str(db), "--format", "json", "--findings", str(findings)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["runs"]) == 18
    verdicts = {r["claim"]: r for r in doc["findings"]["rows"]}
    assert verdicts["lora-beats-icl"]["verdict"] == "supported" and verdicts["lora-beats-icl"]["lo"] > 0
    assert verdicts["lora-close-to-ft-ood"]["options_b"] == ["ft (4 shots)"]
    assert doc["findings"]["hypotheses"] == 4
    # without --findings, json is still the list of runs; the default study says nothing about the toy task
    assert main(["results", "--db", str(db), "--format", "json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep2")]) == 0
    assert "findings on" not in (tmp_path / "rep2" / "report.md").read_text()


def store_cola_runs(db, labels, seeds=(0, 1), n=100):
    """Synthetic cola runs of these options (label = method, cd-* = cd with a few-shot teacher), 70% right."""
    rng = np.random.default_rng(3)
    gold = np.array([1, 1, 0] * (n // 3) + [1])
    with Store(db) as store:
        for seed in seeds:
            for label in labels:
                cfg = RunConfig(task="cola", model="m", method=label.split("-")[0],
                                method_options={"context": "few-shot"} if label.startswith("cd") else {},
                                shots=8, seed=seed, eval_limit=n)
                evals, preds = {}, {}
                for role, split in (("in_domain", "in_domain_dev"), ("out_of_domain", "out_of_domain_dev")):
                    pred = np.where(rng.random(n) < 0.7, gold, 1 - gold)
                    logprobs = np.log(np.full((n, 2), 0.5))
                    evals[split] = {"role": role, **metrics.evaluation(
                        gold.tolist(), pred.tolist(), logprobs, ["unacceptable", "acceptable"], ("accuracy", "mcc"))}
                    preds[split] = {"idx": list(range(n)), "gold": gold.tolist(), "pred": pred.tolist(),
                                    "logprobs": logprobs.tolist()}
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), {"config": cfg.to_dict(), "identity": cfg.identity(), "examples_used": 8,
                                          "task": {"name": "cola", "primary_metric": "mcc",
                                                   "labels": ["unacceptable", "acceptable"]},
                                          "evals": evals, "predictions": preds, "cost": {"train_seconds": 1.0}})


def test_study_is_the_default_and_none_turns_it_off(tmp_path, capsys):
    """A cola database: the report opens with the study's findings (and says they are the default); the demo's
    labels without lora get 'no runs for lora', never an error; --findings none leaves the section out."""
    db = tmp_path / "cola.db"
    store_cola_runs(db, ("icl", "ft", "pbft", "cd-fewshot"))
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "a")]) == 0
    md = (tmp_path / "a" / "report.md").read_text()
    section = md[md.index("## The study's findings on your results"):md.index("## Task cola")]
    assert "No findings file was given" in section
    for cid in ("alternatives-ood-comparable", "pbft-worse-than-ft-ood", "adaptive-lora-not-better",
                "cd-better-than-standard", "finetuning-icl-ood-similar"):
        assert re.search(rf"^\| {cid} \| [a-z ]+ \| [^|]+ \| cola / m \| 8 \|", section, flags=re.M)
    assert "no runs for adaptive, lora at 8 shots" in section
    assert "Source: arXiv 2405.13181" in section
    closing = md[md.index("## Which method for which budget"):]
    assert "The study's findings here (first section" in closing and "pbft-worse-than-ft-ood at 8 shots: " in closing
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "b"), "--findings", "none"]) == 0
    assert "findings" not in (tmp_path / "b" / "report.md").read_text().split("## Task cola")[0]


# ----------------------------------------------------------------------------- bad input: one line, exit 2
GOOD = 'id = "c"\nrelation = "better"\na = ["lora"]\nb = ["ft"]\nsplit = "in_domain"'


@pytest.mark.parametrize("text, message", [
    ("[[claims]\nid = 1", "is not valid TOML"),
    ("title = 'no claims'", "needs a [[claims]] list"),
    (claims_file(GOOD.replace('"better"', '"superior"')), "unknown relation 'superior'"),
    (claims_file(GOOD.replace('a = ["lora"]', "a = []")), "claim 'c': 'a' is an empty group"),
    (claims_file(GOOD.replace('"better"', '"equivalent"')), "needs a margin"),
    (claims_file(GOOD.replace('"better"', '"equivalent"') + "\nmargin = 0"), "must be > 0"),
    (claims_file(GOOD.replace('"better"', '"equivalent"') + "\nmargin = 2.5"), "at most 2"),
    (claims_file(GOOD.replace('"better"', '"noninferior"') + '\nmargin = 1.5\ntasks = ["mnli"]'), "at most 1"),
    (claims_file(GOOD + "\nmargni = 0.1"), "unknown key 'margni'. Did you mean: margin?"),
    (claims_file(GOOD.replace('"in_domain"', '"ood"')), "unknown split 'ood'"),
    (claims_file(GOOD.replace('b = ["ft"]', 'b = ["lora"]')), "is in both 'a' and 'b'"),
    (claims_file(GOOD, GOOD), "claim id 'c' is used twice"),
    ("titel = 'x'\n" + claims_file(GOOD), "unknown key 'titel'. Did you mean: title?"),
])
def test_bad_findings_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FewtuneError) as e:
        load_findings(path)
    assert message in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)
    # the same through the CLI: exit 2, one line (check with --spec, so an unparsable file is read as findings)
    assert main(["check", str(path), "--spec", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert main(["report", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "r"),
                 "--findings", str(path)]) == 2


def test_check_against_a_grid_spec(tmp_path, capsys):
    f = parse_findings({"claims": [dict(id="c", relation="better", a=["cd-*"], b=["lorra"], split="in_domain")]},
                       "mine.toml")
    with pytest.raises(FewtuneError, match=r"mine.toml claim 'c': label 'lorra' names no option of spec x. "
                                           r"Did you mean: lora\?"):
        check_against_labels(f, ["lora", "cd-fewshot"], "spec x")
    with pytest.raises(FewtuneError, match="glob 'cd-\\*' names no option"):
        check_against_labels(f, ["lora", "lorra"], "spec x")
    assert main(["check", "study", "--spec", "demo"]) == 0
    assert "ok: shipped study.toml is a valid findings file" in capsys.readouterr().out
    path = tmp_path / "f.toml"
    path.write_text(claims_file(GOOD))
    assert main(["check", str(path)]) == 0  # recognised as a findings file without --spec
    assert main(["check", "nosuch.toml", "--spec", "demo"]) == 2
    assert main(["results", "--db", str(tmp_path / "x.db"), "--findings", "study"]) == 2  # json only
    assert "--findings goes with --format json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- grid specs: findings = ..., --models
def test_a_spec_declares_its_findings_and_they_must_name_its_labels(tmp_path):
    from fewtune.grid.grid_spec import expand, load_grid
    assert load_grid("demo").findings == "study"  # the shipped grids judge the study's claims
    spec = {"models": ["m"], "tasks": ["cola"], "seeds": [0, 1], "findings": "study",
            "methods": [{"method": "icl", "label": "icl"}, {"method": "ft", "label": "ft"}]}
    with pytest.raises(FewtuneError, match=r"claim '[a-z-]+': (label|glob) '[^']+' names no option of my-spec"):
        expand(spec, where="my-spec")
    assert expand({**spec, "findings": "none"}, where="my-spec").findings == "none"
    with pytest.raises(FewtuneError, match=r"my-spec: 'findings' must be a findings file"):
        expand({**spec, "findings": 3}, where="my-spec")


def test_models_override_runs_the_studys_design_on_another_model():
    from fewtune.grid.grid_spec import load_grid
    paper = load_grid("paper")
    mine = load_grid("paper", models=["smollm2-135m"])
    assert {c.config.model for c in mine.cells} == {"smollm2-135m"}
    assert len(mine.cells) == len(paper.cells) // len({c.config.model for c in paper.cells})
    assert {(c.label, c.config.shots, c.config.seed, c.config.task) for c in mine.cells} == \
        {(c.label, c.config.shots, c.config.seed, c.config.task) for c in paper.cells}


# ----------------------------------------------------------------------------- lpft.toml: judged where its options ran
def test_lpft_findings_are_judged_where_lpft_and_ft_ran(tmp_path, capsys):
    """Results with lpft and ft: the report judges Kumar et al.'s claims in a section of their own, beside the
    study's (each file its own family, Holm within it); --findings none leaves both out, a user's file stands alone;
    results without lpft get no such section."""
    db = tmp_path / "cola.db"
    store_cola_runs(db, ("icl", "ft", "pbft", "lpft"), seeds=(0, 1, 2, 3))
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "a")]) == 0
    md = (tmp_path / "a" / "report.md").read_text()
    heading = "## Published findings on your results: LP-FT against fine-tuning (Kumar et al., ICLR 2022)"
    assert "## The study's findings on your results" in md and heading in md
    section = md[md.index(heading):md.index("## Task cola")]
    for cid in ("lpft-not-worse-in-domain", "lpft-better-ood"):
        assert re.search(rf"^\| {cid} \| [a-z ]+ \| [^|]+ \| cola / m \| 8 \|", section, flags=re.M)
    assert "Source: Kumar et al., ICLR 2022 (arXiv 2202.10054)" in section
    assert "Each findings file is its own family" in section and "over 4 one-sided tests" in section
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "b"), "--findings", "lpft"]) == 0
    md = (tmp_path / "b" / "report.md").read_text()
    # the study's pbft-worse-than-ft-ood has its options here: judged too, after lpft's, as its companion
    assert md.index(heading) < md.index("## The study's findings on your results") < md.index("## Task cola")
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "c"), "--findings", "none"]) == 0
    assert "findings on your results" not in (tmp_path / "c" / "report.md").read_text()
    mine = tmp_path / "mine.toml"
    mine.write_text(claims_file('id = "c"\nrelation = "better"\na = ["ft"]\nb = ["icl"]\nsplit = "in_domain"'))
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "d"), "--findings", str(mine)]) == 0
    assert "Kumar" not in (tmp_path / "d" / "report.md").read_text().split("## Task cola")[0]
    db2 = tmp_path / "no-lpft.db"
    store_cola_runs(db2, ("icl", "ft", "pbft"))
    assert main(["report", "--db", str(db2), "--out", str(tmp_path / "e")]) == 0
    assert "Kumar" not in (tmp_path / "e" / "report.md").read_text()


def test_companions_are_the_shipped_files_the_labels_can_answer():
    from fewtune.findings import companions
    study, lpft = load_findings("study"), load_findings("lpft")
    assert [f.source for f in companions(study, ["icl", "ft", "lpft"])] == ["shipped lpft.toml"]
    assert companions(study, ["icl", "ft", "probe"]) == []  # lpft has no runs: nothing to answer
    assert [f.source for f in companions(lpft, ["ft", "pbft", "icl", "lpft"])] == ["shipped study.toml"]
    assert companions(lpft, ["ft", "lpft", "zero-shot"]) == []  # no study claim has all its options here
    assert companions(parse_findings({"claims": [dict(id="c", relation="better", a=["ft"], b=["icl"],
                                                      split="in_domain")]}, "mine.toml"), ["ft", "lpft"]) == []


def test_lpft_findings_check_against_the_shipped_grids(capsys):
    assert main(["check", "lpft", "--spec", "beyond"]) == 0
    assert main(["check", "lpft.toml", "--spec", "paper"]) == 0  # paper's opt-in list has lpft
    out = capsys.readouterr().out
    assert out.count("ok: shipped lpft.toml is a valid findings file") == 2
    assert main(["check", "lpft", "--spec", "cpu"]) == 2  # cpu's cells are unchanged: no lpft there
    assert "label 'lpft' names no option of grid cpu" in capsys.readouterr().err


def test_opt_in_lists_add_options_and_leave_the_specs_own_cells_alone(capsys):
    from fewtune.grid.grid_spec import load_grid
    paper, ood = load_grid("paper"), load_grid("paper", opt_in=["ood"])
    assert paper.opt_in == () and ood.opt_in == ("ood",) and set(paper.opt_in_labels) == {"probe", "lpft", "bitfit"}
    keys = {c.key for c in paper.cells}
    assert keys < {c.key for c in ood.cells}
    added = [c for c in ood.cells if c.key not in keys]
    assert {c.label for c in added} == {"probe", "lpft", "bitfit"} and len(added) == 240
    with pytest.raises(FewtuneError, match=r"--opt-in oods: preset paper has no opt-in method list 'oods' "
                                           r"\(its lists: ood\)\. Did you mean: ood\?"):
        load_grid("paper", opt_in=["oods"])
    with pytest.raises(FewtuneError, match=r"preset cpu has no opt-in method list 'ood' \(it has none\)"):
        load_grid("cpu", opt_in=["ood"])
    assert main(["grid", "paper", "--opt-in", "", "--dry-run"]) == 2
    assert "--opt-in needs the name" in capsys.readouterr().err
    beyond = load_grid("beyond")
    assert beyond.findings == "lpft" and {c.label for c in beyond.cells} == {"zero-shot", "icl", "ft", "probe",
                                                                              "lpft", "bitfit"}


# ----------------------------------------------------------------------------- the step-down's level and the looks
def test_holm_holds_every_kept_hypothesis_at_the_level_where_it_stopped():
    """p = [.001, .03, .04, .045]: .001 is rejected at α/4, the step-down stops at .03 (α/3), and every later one is
    held to α/3 too (an interval at α/2 or α/1 would clear 0 for a hypothesis that was not rejected)."""
    from fewtune.findings.judge import holm_levels
    adjusted, rejected, level = holm_levels(np.array([0.001, 0.03, 0.04, 0.045]))
    assert list(rejected) == [True, False, False, False]
    assert list(level) == [4, 3, 3, 3]
    _, rejected, level = holm_levels(np.array([0.04, 0.001, 0.045, 0.03]))  # the same, in another order
    assert list(level) == [3, 4, 3, 3]


def test_the_looks_come_from_the_grid_s_seeds_not_from_where_the_runs_stopped():
    """Runs of a 6-seed spec that stopped at 4 seeds are judged at the plan's share for the look at 4 (α(4/6)), not
    at the full α a 4-seed spec would have; without a recorded plan the most seeds present stand for it."""
    from fewtune.stats.sequential import Plan
    rng = np.random.default_rng(1)
    gold, preds = simulate(rng, {"good": 0.8, "bad": 0.7}, seeds=4, n=300)
    f = parse_findings({"claims": [dict(id="g", relation="better", a=["good"], b=["bad"], split="in_domain")]},
                       "t.toml")
    plain = [group(k, v, gold) for k, v in preds.items()]
    (row,) = [r for r in judge(f, plain).rows if r.task == "mnli"]
    assert row.looks == pytest.approx(1.0) and row.look == 4
    planned = [dict(g, seed_plan=list(range(6))) for g in plain]
    (row6,) = [r for r in judge(f, planned).rows if r.task == "mnli"]
    assert row6.looks == pytest.approx(0.05 / Plan(6).share(4))
    assert row6.hi - row6.lo > row.hi - row.lo  # a smaller share of α: a wider interval

"""Hostile inputs found by trying fewtune as a new user would (issue 25): each was accepted, or blamed on the wrong
place, before. Each is now one line `fewtune: error: ...` naming the file, key or flag the user gave, exit 2,
nothing written. The fixtures and checks are test_hostile.py's."""

from __future__ import annotations

import pytest

from fewtune.cli import main
from test_hostile import GRID_SPEC, Env, assert_one_line_error, env, results_db, snapshot  # noqa: F401 (fixtures)
from test_hostile_files import saved

UTF16 = "The cat sat on the mat.\nA second sentence.\n".encode("utf-16-le")  # no byte-order mark: every other byte NUL


def peft_dropout(e: Env, value: str) -> list[str]:
    return e.run("--method", "peft", "--peft-type", "LORA", "--peft-option", f"lora_dropout={value}")


def findings(e: Env, text: str) -> str:
    return str(e.write("my-claims.toml", text))


MARGIN_CLAIMS = '''
[[claims]]
id = "lora-like-ft"
relation = "equivalent"
a = ["icl"]
b = ["icl*"]
split = "in_domain"
margin = 1.5
'''

# id, builds the input -> argv, fragments the one-line error must hold, fragments it must not
CASES = [
    ("peft-option-nan", lambda e: peft_dropout(e, "nan"), ["lora_dropout", "nan"], []),
    ("peft-option-negative", lambda e: peft_dropout(e, "-0.5"), ["lora_dropout", "-0.5"], []),
    ("retention-text-utf16", lambda e: e.run("--retention-text", str(e.write("utf16.txt", UTF16))),
     ["utf16.txt", "NUL"], []),
    ("predict-input-utf16", lambda e: ["predict", "--model-dir", str(saved(e)), "--input",
                                       str(e.write("utf16.txt", UTF16)), "--device", "cpu"],
     ["--input", "utf16.txt", "NUL"], []),
    ("spec-model-config-not-json", lambda e: e.grid(GRID_SPEC.replace(
        'models = ["fake-model"]', f'models = ["{e.model_copy(add={"config.json": "{not json"})}"]'), name="g.toml")
     + ["--dry-run"], ["model-copy", "config.json", "not valid JSON"], []),
    ("check-findings-margin-beyond-accuracy", lambda e: [
        "check", findings(e, MARGIN_CLAIMS), "--spec", str(e.write("mnli.toml", GRID_SPEC.replace('["cola"]', '["mnli"]')))],
     ["margin", "1.5", "accuracy", "mnli"], []),
    ("spec-workers-too-many", lambda e: e.grid("workers = 4096\n" + GRID_SPEC.replace("fake-model", str(e.model)))
     + ["--dry-run"],
     ["workers = 4096", "bad-grid.toml"], ["--workers"]),
    ("models-flag-twice", lambda e: e.grid(GRID_SPEC) + ["--models", "fake-model,fake-model", "--dry-run"],
     ["--models", "twice"], ["'models' lists"]),
    ("findings-claim-singular", lambda e: ["check", findings(e, MARGIN_CLAIMS.replace("[[claims]]", "[[claim]]"))],
     ["my-claims.toml", "[[claims]]", "Did you mean"], ["'title'"]),
]


@pytest.mark.parametrize("make, fragments, absent", [pytest.param(m, f, a, id=i) for i, m, f, a in CASES])
def test_hostile_input_is_one_line_naming_what_the_user_gave(env, make, fragments, absent, capsys, monkeypatch):
    monkeypatch.delenv("FEWTUNE_GRID_RUNNER")  # the real runner's checks (models named by the spec)
    argv = make(env)
    before = snapshot(env.db)
    code = main(argv)
    line = assert_one_line_error(code, capsys.readouterr().err, fragments)
    assert code == 2 and not any(a in line for a in absent), line
    assert snapshot(env.db) == before


def test_a_refused_report_leaves_no_output_folder(env, capsys):
    out = env.root / "new-report"
    code = main(["report", "--db", str(env.db), "--out", str(out), "--equivalence-margin", "1.5"])
    assert_one_line_error(code, capsys.readouterr().err, ["1.5"])
    assert not out.exists()


def test_a_findings_file_the_database_names_that_has_moved_is_a_warning(env, capsys):
    """A grid recorded `findings = "my-claims.toml"` and the file has since moved: the report is written, with one
    warning that says the name came from the database (it was refused as if the user had typed it)."""
    from fewtune.store import Store
    with Store(env.db) as store:
        store.set_meta("findings", str(env.root / "moved-away.toml"))
    out = env.root / "report"
    assert main(["report", "--db", str(env.db), "--out", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fewtune: warning:")]
    assert len(warnings) == 1 and "moved-away.toml" in warnings[0] and "recorded in the database" in warnings[0]
    assert (out / "report.md").is_file()

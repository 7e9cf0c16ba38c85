"""Every input means what it says (issue 13): options that were silently ignored or refused, checks that
tested the wrong invariant, and errors that gave the wrong advice."""

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
    (["run", "--method", "pbft", "--lora-r", "4"], ["--lora-r applies to method(s) cd, lora, not 'pbft'"]),
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

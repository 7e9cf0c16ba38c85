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

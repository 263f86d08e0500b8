"""The parser: every option explains itself, one name per concept, bare `slimtune` teaches.

The references: argparse's own record of each command's actions (so a flag added without a
help line fails here), PEFT's LoraConfig for the alpha default, and the flag spellings that
`train --nproc` rebuilds for torchrun.
"""

from __future__ import annotations

import argparse

import peft
import pytest

from slimtune.cli.main import main
from slimtune.cli.parser import COMMANDS, build_parser
from slimtune.config import LoraConfig
from slimtune.methods.lora.recipe import lora_config
from slimtune.training.distributed import train_argv


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_is_in_the_table_and_has_an_example() -> None:
    commands = subparsers()
    assert set(commands) == set(COMMANDS)
    for name, parser in commands.items():
        text = parser.format_help()
        assert f"examples:\n  slimtune {name}" in text, name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_a_default(command: str) -> None:
    parser = subparsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if not action.option_strings or action.required:
            continue
        shown = formatter._get_help_string(action)
        assert "default" in shown or "required" in shown, f"{command} {action.option_strings}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_options_are_grouped(command: str) -> None:
    parser = subparsers()[command]
    titles = {g.title for g in parser._action_groups if g._group_actions}
    loose = [a for a in parser._optionals._group_actions if a.dest != "help"]
    assert not loose, f"{command}: {[a.option_strings for a in loose]} outside a group"
    if command != "inspect":
        assert "output" in titles or command == "generate"


def test_one_name_per_concept_old_spellings_hidden() -> None:
    parser = build_parser()
    old = parser.parse_args(["eval", "--model", "m", "--data", "d", "--quantize", "nf4"])
    new = parser.parse_args(["eval", "--model", "m", "--data", "d", "--quant", "nf4"])
    assert old.quant == new.quant == "nf4"
    args = ["compare", "--model", "m", "--data", "d", "--out", "o"]
    assert parser.parse_args([*args, "--ranks", "1,8"]).ranks == "1,8"
    assert parser.parse_args([*args, "--sweep-ranks", "1,8"]).ranks == "1,8"
    assert parser.parse_args([*args, "--lr", "0.01"]).lr == 0.01
    assert "--quantize" not in subparsers()["eval"].format_help()
    assert "--ranks" not in subparsers()["compare"].format_help()
    spellings: dict[str, set[str]] = {}
    for parser_ in subparsers().values():
        for action in parser_._actions:
            if action.help != argparse.SUPPRESS and action.option_strings:
                spellings.setdefault(action.dest, set()).update(action.option_strings)
    assert {dest: s for dest, s in spellings.items() if len(s) > 1 and dest != "help"} == {}


def test_bare_slimtune_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: slimtune") and "train" in err and "slimtune slimtune" not in err


def test_a_bad_flag_is_one_line_naming_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--model", "m", "--data", "d", "--bogus"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slimtune eval: error:") and "--bogus" in err


def test_alpha_default_is_the_same_in_cli_python_and_peft() -> None:
    assert lora_config({}).lora_alpha == LoraConfig().lora_alpha == peft.LoraConfig().lora_alpha
    assert lora_config({"rank": 64}).lora_alpha == LoraConfig(r=64).lora_alpha
    assert lora_config({"rank": 4, "alpha": 32}).lora_alpha == 32


def test_train_flags_round_trip_through_torchrun_argv() -> None:
    """`train --nproc` rebuilds the command line from the parsed names: dest = flag name."""
    parser = build_parser()
    argv = ["train", "--model", "m", "--data", "d.jsonl", "--out", "o", "--method", "qlora",
            "--quant", "fp4", "--rank", "4", "--alpha", "16", "--lr", "0.001", "--resume",
            "--target-modules", "q_proj,v_proj", "--eval-data", "e.jsonl", "--eval-every", "2",
            "--grad-accum", "2", "--nproc", "2"]  # fmt: skip
    args = parser.parse_args(argv)
    again = parser.parse_args(["train", *train_argv(args)])
    assert {**vars(again), "nproc": 2} == vars(args)

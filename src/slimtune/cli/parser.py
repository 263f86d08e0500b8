"""The parser of `slimtune <command> …`: the commands with their one-line help and example
epilogue (COMMANDS), their flags (flags.py), and argparse set up so that a bad flag is one
line and `--help` shows each default (`_Formatter`: the value, or the words in the help
text where the default is resolved later, e.g. from --config).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from slimtune import __version__
from slimtune.cli.flags import (
    compare_flags,
    demo_flags,
    eval_flags,
    export_flags,
    generate_flags,
    inspect_flags,
    merge_flags,
    train_flags,
    ui_flags,
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogue's line breaks and appends '(default: X)' where X says something.

    A flag whose default is None (resolved later: from --config, the method, the run)
    states its default in its help text instead; store_true flags default to off.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or not action.option_strings:
            return text
        if action.default is False:
            return text + " (default: off)"
        if action.default not in (None, argparse.SUPPRESS):
            return text + " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit 2), like every other error."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        if not argv and self.prog == "slimtune":  # bare `slimtune`: the usage, not an error
            self.print_help(sys.stderr)
            self.exit(2)
        args, extra = self.parse_known_args(argv, namespace)
        if extra:  # named by the command that got them: `slimtune eval: error: …`
            commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            command = commands[0].choices.get(args.command) if commands else None
            (command or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return args


# command: (flags, one-line help, example epilogue)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str, str]] = {
    "train": (
        train_flags,
        "fine-tune a model",
        "  slimtune train --model smollm2-135m --data train.jsonl --method lora --out runs/a\n"
        "  slimtune train --config runs/a/config.yaml --lr 1e-3 --out runs/b\n"
        "  slimtune train --out runs/a --resume --max-steps 200",
    ),
    "eval": (
        eval_flags,
        "loss, perplexity and exact match on a data set",
        "  slimtune eval --model smollm2-135m --adapter runs/a/adapter --data test.jsonl\n"
        "  slimtune eval --model smollm2-135m --data test.jsonl --json base.json",
    ),
    "generate": (
        generate_flags,
        "generate text, streaming tokens",
        '  slimtune generate --model smollm2-135m --adapter runs/a/adapter --prompt "Hi"',
    ),
    "merge": (
        merge_flags,
        "merge an adapter into a plain transformers directory",
        "  slimtune merge --model smollm2-135m --adapter runs/a/adapter --out merged/",
    ),
    "export": (
        export_flags,
        "merged safetensors, GGUF or GGUF LoRA files",
        "  slimtune export --model smollm2-135m --adapter runs/a/adapter --format gguf "
        "--out a.gguf\n"
        "  slimtune export --model smollm2-135m --adapter runs/a/adapter --format gguf-lora "
        "--out a-lora.gguf",
    ),
    "compare": (
        compare_flags,
        "train several methods side by side and write a report",
        "  slimtune compare --model smollm2-135m --data train.jsonl --methods lora,ia3,full "
        "--out cmp/\n"
        "  slimtune compare --model smollm2-135m --data train.jsonl --methods lora "
        "--sweep-ranks 1,8,64 --out sweep/",
    ),
    "inspect": (
        inspect_flags,
        "what an adapter directory holds",
        "  slimtune inspect runs/a/adapter",
    ),
    "demo": (
        demo_flags,
        "fine-tune the built-in model on the bundled data set",
        "  slimtune demo\n  slimtune demo --out runs/demo2 --quiet",
    ),
    "ui": (
        ui_flags,
        "the local web app: train, watch, chat, evaluate, compare and export (slimtune[ui])",
        "  slimtune ui\n  slimtune ui --root ~/finetune --port 8000\n"
        "  slimtune ui --host 0.0.0.0 --auth-file pass.txt",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slimtune",
        description="Parameter-efficient fine-tuning.",
        epilog="`slimtune COMMAND --help` lists a command's options.\n\nexamples:\n"
        + COMMANDS["demo"][2]
        + "\n"
        + COMMANDS["train"][2].splitlines()[0],
    )
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for name, (add_flags, summary, examples) in COMMANDS.items():
        add_flags(
            sub.add_parser(
                name,
                help=summary,
                description=summary[0].upper() + summary[1:] + ".",
                epilog="examples:\n" + examples,
            )
        )
    return parser

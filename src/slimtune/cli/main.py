"""The command line: `slimtune <command> …` (also `python -m slimtune …`).

Each command is a thin function that parses flags into library calls. User mistakes
arrive as SlimtuneError and are printed as one line with a non-zero exit; anything
else is a bug, printed as one line too (`slimtune: internal error (…)`, exit 3), with
its traceback under SLIMTUNE_DEBUG=1. The parser itself is in parser.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from slimtune.cli.parser import build_parser
from slimtune.errors import SlimtuneError


def _handler(command: str) -> Callable[[argparse.Namespace], int | None]:
    """Import the module that runs a command only when it is asked for (fast start-up);
    what it writes is removed again if it fails (train and demo: training/rundir.py's rule,
    which keeps checkpoints for --resume)."""
    from importlib import import_module

    module = import_module(f"slimtune.cli.{command}")

    def run(args: argparse.Namespace) -> int | None:
        from slimtune.atomic import undone_on_failure

        with undone_on_failure(*_outputs(args)):
            return module.run(args)

    return run


def _outputs(args: argparse.Namespace) -> list[str]:
    """The paths a command writes (a new command that writes adds its case here)."""
    if args.command == "export":
        from slimtune.export.gguf import output_paths

        return [args.out, *map(str, output_paths(args.format, args.out))]
    if args.command in ("merge", "compare"):
        return [args.out]
    if args.command == "eval" and args.json:
        return [args.json]
    return []


# exit codes (README: "What slimtune promises"); a bad flag exits with argparse's 2
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_CLOSED_PIPE = 1, 3, 130, 141


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        module = "demo_preference" if getattr(args, "preference", False) else args.command
        code = int(_handler(module)(args) or 0)  # demo --preference: cli/demo_preference.py
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except SlimtuneError as exc:
        code = getattr(exc, "exit_code", EXIT_USER_ERROR)  # a stopped run: 128 + signal
        kind = "error: " if code == EXIT_USER_ERROR else ""
        print(f"slimtune {args.command}: {kind}{exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"slimtune {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `slimtune inspect … | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE
    except Exception as exc:  # a bug: one line, unless the user asks for the traceback
        if os.environ.get("SLIMTUNE_DEBUG"):
            raise
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        print(
            f"slimtune: internal error ({type(exc).__name__}: {text}); "
            "run with SLIMTUNE_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR

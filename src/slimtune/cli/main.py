"""The command line: `slimtune <command> …` (also `python -m slimtune …`).

Each command is a thin function that parses flags into library calls. User mistakes
arrive as SlimtuneError and are printed as one line with a non-zero exit; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from slimtune import __version__
from slimtune.errors import SlimtuneError
from slimtune.methods.table import method_names

METHODS = tuple(method_names())  # the rows of slimtune.methods.table
QUANTS = ("nf4", "fp4", "int8")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"slimtune {self.prog.split()[-1]}: error: {message}\n")


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="transformers directory, .gguf file or built-in name")
    p.add_argument("--data", help="JSONL (prompt/completion, messages, text) or .txt")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--out", help="run directory")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--target-modules", default=None, help="comma-separated suffixes or all-linear")
    p.add_argument("--quant", choices=QUANTS, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--config", default=None, help="YAML file of training options; flags override it"
    )
    p.add_argument("--nproc", type=int, default=None, help="start torchrun with N processes")
    p.add_argument("--eval-data", default=None, help="held-out data, evaluated during training")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--schedule", choices=("linear", "cosine", "constant"), default=None)
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout")
    p.add_argument("--num-virtual-tokens", type=int, default=None, help="prompt: soft tokens")
    p.add_argument("--prompt-init", default=None, help="prompt: start from this text's embeddings")
    p.add_argument("--bottleneck-size", type=int, default=None, help="adapter: bottleneck width")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimtune", description="Parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _train_flags(sub.add_parser("train", help="fine-tune a model"))

    p = sub.add_parser("eval", help="loss, perplexity and exact match on a data set")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--quantize", choices=QUANTS, default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("generate", help="generate text, streaming tokens")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("merge", help="merge an adapter into a plain transformers directory")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--into", choices=("trained", "original"), default="trained")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("export", help="merged safetensors, GGUF or GGUF LoRA files")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--format", choices=("safetensors", "gguf", "gguf-lora"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--dtype",
        choices=("f32", "f16", "bf16", "q8_0"),
        default=None,
        help="GGUF: f16 by default; safetensors: the source's dtype by default",
    )
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("compare", help="train several methods side by side and write a report")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--methods", default="lora,qlora,dora,ia3,prompt,adapter,full")
    p.add_argument("--eval-data", default=None, help="held-out data (default: a fifth of --data)")
    p.add_argument("--out", required=True)
    p.add_argument("--ranks", default=None, help="comma-separated LoRA ranks to sweep")
    p.add_argument("--rank", type=int, default=None, help="rank of lora, qlora and dora (8)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep-runs", action="store_true", help="keep DIR/runs/ (adapters, metrics)")
    p.add_argument("--jobs", type=int, default=None, help="training runs at a time (1)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("inspect", help="what an adapter directory holds")
    p.add_argument("path")

    p = sub.add_parser("demo", help="fine-tune the built-in model on the bundled data set")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quiet", action="store_true")
    return parser


def _handler(command: str) -> Callable[[argparse.Namespace], int | None]:
    """Import the module that runs a command only when it is asked for (fast start-up)."""
    from importlib import import_module

    module = import_module(f"slimtune.cli.{command}")
    return module.run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_handler(args.command)(args) or 0)
    except SlimtuneError as exc:
        print(f"slimtune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"slimtune {args.command}: interrupted", file=sys.stderr)
        return 130

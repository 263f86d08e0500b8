"""The command line: `slimtune <command> …` (also `python -m slimtune …`).

Each command is a thin function that parses flags into library calls. User mistakes
arrive as SlimtuneError and are printed as one line with a non-zero exit; anything
else is a bug, printed as one line too (`slimtune: internal error (…)`, exit 3), with
its traceback under SLIMTUNE_DEBUG=1.

The parser: one `_<command>_flags(parser)` function per command, each putting its flags
into the groups of `_groups` (model, data, method, training, output). Every flag has a
help line; `--help` shows each default (`_Formatter`: the value, or the words in the help
text where the default is resolved later, e.g. from --config). One name per concept
across commands; an old spelling stays as a hidden alias (`_alias`) for a release.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from slimtune import __version__
from slimtune.errors import SlimtuneError
from slimtune.export.quantize import LLAMACPP_TYPES
from slimtune.methods.table import method_names

METHODS = tuple(method_names())  # the rows of slimtune.methods.table
QUANTS = ("nf4", "fp4", "int8")
LORA_ALPHA = 8  # --alpha's default, the same as LoraConfig's and PEFT's lora_alpha
GROUPS = ("model", "data", "method", "training", "output")


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


def _groups(p: argparse.ArgumentParser, **titles: str) -> dict[str, argparse._ArgumentGroup]:
    """The argument groups of a command, in --help's order; empty ones are not shown."""
    titles = {"model": "model (what to load)", "method": "method (what trains)", **titles}
    return {name: p.add_argument_group(titles.get(name, name)) for name in GROUPS}


def _alias(group: argparse._ArgumentGroup, old: str, dest: str, **kwargs) -> None:
    """An old spelling of a flag, kept working for a release but not shown in --help."""
    group.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def _num(g: argparse._ArgumentGroup, flag: str, help: str, kind: type = int, **kwargs) -> None:
    """A number flag (default None: resolved later, so `help` states the default)."""
    metavar = "N" if kind is int else "X"
    g.add_argument(flag, type=kind, default=None, metavar=metavar, help=help, **kwargs)


def _model_flag(g: argparse._ArgumentGroup, required: bool = True) -> None:
    g.add_argument(
        "--model",
        required=required,
        metavar="MODEL",
        help="transformers directory, .gguf file or built-in name (smollm2-135m)"
        + ("" if required else "; required unless --config or --resume gives it"),
    )


def _adapter_flag(g: argparse._ArgumentGroup, required: bool = False) -> None:
    g.add_argument(
        "--adapter",
        required=required,
        default=None,
        metavar="DIR",
        help="adapter directory (RUN/adapter of a train run)"
        + ("" if required else "; default: none, the base model alone"),
    )


def _quant_flag(g: argparse._ArgumentGroup, help: str) -> None:
    g.add_argument("--quant", choices=QUANTS, default=None, help=help)


def _quiet_flag(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--quiet", action="store_true", help="print only the result (no progress)")


def _overwrite_flag(g: argparse._ArgumentGroup, what: str) -> None:
    g.add_argument("--overwrite", action="store_true", help=f"replace {what} already in --out")


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = _groups(p)
    _model_flag(g["model"], required=False)
    g["model"].add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="file of training options (any flag's name: value); flags override it; "
        "RUN/config.yaml of an earlier run works (default: none)",
    )
    g["data"].add_argument(
        "--data",
        metavar="FILE",
        help="JSONL, CSV, Parquet or a datasets.save_to_disk directory (prompt/completion, "
        "messages, Alpaca, ShareGPT or text rows; a,b joins files) or .txt; "
        "required unless --config or --resume gives it",
    )
    g["data"].add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="held-out data, evaluated at the end (and every --eval-every steps); default: none",
    )
    _num(
        g["data"],
        "--max-length",
        "tokens per row; longer rows are cut, .txt is packed to it (default: 512)",
    )
    g["data"].add_argument(
        "--chat-template",
        default=None,
        metavar="NAME",
        help="chatml, llama3 or FILE.jinja: renders chat rows, saved with the adapter "
        "(default: the model's own)",
    )
    m = g["method"]
    m.add_argument("--method", choices=METHODS, default=None, help="what trains (default: lora)")
    _num(m, "--rank", "lora, qlora, dora: rank r (default: 8)")
    m.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"lora, qlora, dora: scaling = alpha / rank (default: {LORA_ALPHA}, as PEFT)",
    )
    _num(m, "--dropout", "lora, qlora, dora: LoRA dropout (default: 0)", float)
    m.add_argument(
        "--target-modules",
        default=None,
        metavar="NAMES",
        help="comma-separated module name suffixes, or all-linear (lora, qlora, dora, ia3); "
        "adapter takes names only (default: PEFT's for the model type; qlora: all-linear)",
    )
    _quant_flag(m, "qlora: how the frozen base is quantized (default: nf4)")
    _num(m, "--num-virtual-tokens", "prompt: soft tokens (default: 20)")
    m.add_argument(
        "--prompt-init",
        default=None,
        metavar="TEXT",
        help="prompt: start from this text's embeddings (default: random)",
    )
    _num(m, "--bottleneck-size", "adapter: bottleneck width (default: 64)")
    t = g["training"]
    _num(t, "--max-steps", "optimizer steps (default: 100)")
    _num(t, "--batch-size", "rows per micro-batch (default: 4)")
    _num(t, "--grad-accum", "micro-batches per step (default: 1)")
    _num(t, "--lr", "peak learning rate (default: 2e-4)", float)
    _num(t, "--warmup-steps", "linear warmup from 0 (default: 0)")
    t.add_argument(
        "--schedule",
        choices=("linear", "cosine", "constant"),
        default=None,
        help="decay after warmup (default: cosine)",
    )
    _num(t, "--seed", "data order, init and dropout (default: 0)")
    _num(t, "--eval-every", "evaluate --eval-data every N steps (default: 0, at the end only)")
    _num(t, "--nproc", "start torchrun with N processes (default: one process, no torchrun)")
    _num(
        t,
        "--neftune-alpha",
        "NEFTune noise on input embeddings in training (default: 0, off)",
        float,
    )
    _num(
        t,
        "--lora-plus-ratio",
        "LoRA+: B matrices train at this x --lr; 16 in the paper (default: 0, off)",
        float,
    )
    t.add_argument(
        "--packing",
        action="store_true",
        default=None,
        help="pack short rows into --max-length sequences; attention never crosses rows "
        "(default: off, rows padded)",
    )
    _objective_flags(t)
    _memory_flags(t)
    o = g["output"]
    o.add_argument(
        "--out", metavar="RUN", help="run directory (adapter/, checkpoints, metrics); required"
    )
    _num(o, "--save-every", "checkpoint every N steps; 0: only the final adapter (default: 50)")
    o.add_argument(
        "--report-to",
        choices=("none", "tensorboard"),
        default=None,
        help="tensorboard: also write RUN/tensorboard/ (default: none)",
    )
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue --out's run from its last checkpoint (its config.yaml, then your flags)",
    )
    _overwrite_flag(o, "a run")
    _quiet_flag(o)


def _memory_flags(g: argparse._ArgumentGroup) -> None:
    """GPU memory: recomputation, its budget and the optimizer's state (training/memory.py)."""
    g.add_argument(
        "--checkpointing",
        default=None,
        metavar="auto|all|none|offload|F",
        help="decoder layers recomputed in backward: all, none, offload (all, inputs in CPU "
        "memory), a share F in (0, 1), or auto: on a GPU as many as --gpu-memory needs, "
        "measured on step 1 (default: auto; on the CPU auto is none)",
    )
    _num(g, "--gpu-memory", "GiB the auto plan may use (default: 90%% of free GPU memory)", float)
    g.add_argument(
        "--optim",
        choices=("adamw", "paged", "8bit"),
        default=None,
        help="AdamW with fp32 state, paged to CPU memory, or in 8 bits (default: adamw)",
    )


def _objective_flags(g: argparse._ArgumentGroup) -> None:
    """--objective and its settings (train and eval; also YAML keys of the same names)."""
    g.add_argument(
        "--objective",
        choices=("sft", "dpo", "orpo"),
        default=None,
        help="sft: learn the answers; dpo, orpo: prefer the chosen answer of "
        "{prompt, chosen, rejected} rows over the rejected one (default: sft)",
    )
    _num(g, "--beta", "dpo: β, how far from the reference; higher: less (default: 0.1)", float)
    g.add_argument(
        "--dpo-loss",
        choices=("sigmoid", "ipo"),
        default=None,
        help="dpo: -log σ(β·margin), or IPO's squared loss (default: sigmoid)",
    )
    _num(g, "--label-smoothing", "dpo: share of preferences assumed flipped (default: 0)", float)
    _num(g, "--orpo-lambda", "orpo: weight of the odds-ratio term (default: 0.1)", float)


def _eval_flags(p: argparse.ArgumentParser) -> None:
    g = _groups(p)
    _model_flag(g["model"])
    _adapter_flag(g["model"])
    _quant_flag(
        g["model"],
        "quantize the base model (default: as the adapter was trained, else unquantized)",
    )
    _alias(g["model"], "--quantize", "quant", choices=QUANTS)
    g["model"].add_argument(
        "--force",
        action="store_true",
        help="score a QLoRA adapter on another --quant than it was trained on",
    )
    g["data"].add_argument("--data", required=True, metavar="FILE", help="JSONL or .txt to score")
    _num(g["data"], "--max-length", "tokens per row (default: 1024)")
    _num(g["training"], "--batch-size", "rows per forward pass (default: 8)")
    _objective_flags(g["training"])
    g["output"].add_argument(
        "--json", default=None, metavar="FILE", help="also write the results here (default: none)"
    )
    _quiet_flag(g["output"])


def _generate_flags(p: argparse.ArgumentParser) -> None:
    g = _groups(p, method="generation")
    _model_flag(g["model"])
    _adapter_flag(g["model"])
    g["data"].add_argument("--prompt", required=True, help="the user's message")
    g["data"].add_argument(
        "--raw", action="store_true", help="send --prompt as is, without the chat template"
    )
    g["method"].add_argument(
        "--max-new-tokens", type=int, default=128, metavar="N", help="stop after this many tokens"
    )
    g["method"].add_argument(
        "--temperature", type=float, default=0.0, metavar="X", help="0: greedy; above: sampling"
    )
    g["method"].add_argument(
        "--seed", type=int, default=None, metavar="N", help="sampling seed (default: 0)"
    )


def _merge_flags(p: argparse.ArgumentParser) -> None:
    g = _groups(p)
    _model_flag(g["model"])
    _adapter_flag(g["model"], required=True)
    g["model"].add_argument(
        "--into",
        choices=("trained", "original"),
        default="trained",
        help="trained: the weights the adapter trained on (a QLoRA base dequantized); "
        "original: the full-precision --model",
    )
    g["output"].add_argument(
        "--out", required=True, metavar="DIR", help="new transformers directory"
    )
    _overwrite_flag(g["output"], "a merged model")


def _export_flags(p: argparse.ArgumentParser) -> None:
    g = _groups(p)
    _model_flag(g["model"])
    _adapter_flag(g["model"])
    o = g["output"]
    o.add_argument(
        "--format",
        choices=("safetensors", "gguf", "gguf-lora", "ollama"),
        required=True,
        help="safetensors: a merged transformers directory; gguf: one merged file for "
        "llama.cpp/Ollama; gguf-lora: the adapter alone for llama.cpp's --lora; ollama: the "
        "GGUF and its Modelfile, and the ollama commands to run it",
    )
    o.add_argument("--out", required=True, metavar="PATH", help="file or directory to write")
    o.add_argument(
        "--dtype",
        choices=("f32", "f16", "bf16", "q8_0", *LLAMACPP_TYPES),
        default=None,
        metavar="TYPE",
        help="weight type: f32, f16, bf16, q8_0, or one llama.cpp's quantizer makes "
        f"({', '.join(LLAMACPP_TYPES)}; needs the llamacpp extra) (default: f16 for GGUF, the "
        "source's dtype for safetensors)",
    )
    _overwrite_flag(o, "an export")


def _compare_flags(p: argparse.ArgumentParser) -> None:
    g = _groups(p)
    _model_flag(g["model"])
    d = g["data"]
    d.add_argument("--data", required=True, metavar="FILE", help="training data (JSONL)")
    d.add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="held-out data (default: a fifth of --data's rows, chosen with --seed)",
    )
    d.add_argument(
        "--hard-eval-data",
        default=None,
        metavar="FILE",
        help="a second held-out split, e.g. wordings never trained on (default: none)",
    )
    _num(d, "--max-length", "tokens per row (default: 256)")
    m = g["method"]
    m.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated methods to train (the base model is always scored)",
    )
    _num(m, "--rank", "rank of lora, qlora and dora (default: 8)")
    m.add_argument(
        "--sweep-ranks",
        dest="ranks",
        default=None,
        metavar="R,R,…",
        help="also train lora at each of these ranks, e.g. 1,2,8,64 (default: none)",
    )
    _alias(m, "--ranks", "ranks")
    t = g["training"]
    _num(t, "--max-steps", "optimizer steps per method (default: 40)")
    _num(t, "--batch-size", "rows per step (default: 8)")
    _num(
        t,
        "--lr",
        "peak learning rate of every method (default: each method's own: "
        "1e-3 lora/qlora/dora/adapter, 3e-2 ia3/prompt, 1e-4 full)",
        float,
    )
    _num(t, "--seed", "data split, order, init (default: 0)")
    _num(t, "--jobs", "training runs at a time (default: 1)")
    t.add_argument(
        "--lr-sweep",
        nargs="?",
        const="default",
        default=None,
        metavar="F,F,…",
        help="try each method at its default lr times each factor and keep the one with the "
        "lowest validation loss (without values: 0.33,1,3; default: off)",
    )
    t.add_argument(
        "--until-plateau",
        nargs="?",
        const=3,
        type=int,
        default=None,
        metavar="K",
        help="stop a run when the validation loss has not improved for K evaluations "
        "(without K: 3; --max-steps stays the cap; default: off)",
    )
    _num(t, "--eval-every", "steps between validation evaluations (default: 10)")
    _num(t, "--val-rows", "training rows kept apart for validation (default: an eighth)")
    _num(t, "--seeds", "seeds per method at its best lr: mean and spread (default: 1)")
    t.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="cpu, cuda or cuda:N (default: CUDA when there is one)",
    )
    o = g["output"]
    o.add_argument(
        "--out", required=True, metavar="DIR", help="report.md, report.json and charts go here"
    )
    o.add_argument("--keep-runs", action="store_true", help="keep DIR/runs/ (adapters, metrics)")
    _overwrite_flag(o, "a report")
    _quiet_flag(o)


def _inspect_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="adapter directory (RUN/adapter) or merged model directory")


def _demo_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("demo")
    g.add_argument(
        "--preference",
        action="store_true",
        help="the DPO demo: prefer one-sentence answers to chatty ones (out: runs/demo-preference)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="RUN", help="run directory (default: runs/demo)")
    _overwrite_flag(o, "a run")
    _quiet_flag(o)


def _ui_flags(p: argparse.ArgumentParser) -> None:
    g = _groups(p)
    g["data"].add_argument("--root", default=".", metavar="DIR", help="the only folder the app "
                           "reads and writes; typed and uploaded paths are resolved inside it")  # fmt: skip
    g["data"].add_argument(
        "--max-upload-mb", type=int, default=100, metavar="MB", help="largest upload"
    )
    o = g["output"]
    o.add_argument("--host", default="127.0.0.1", help="address to serve on; another than "
                   "loopback needs --auth or --auth-file")  # fmt: skip
    o.add_argument("--port", type=int, default=7860, metavar="N", help="port")
    o.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="password for the page (default: none, loopback only)")  # fmt: skip
    o.add_argument("--auth-file", default=None, metavar="FILE",
                   help="file holding USER:PASSWORD (default: none)")  # fmt: skip


# command: (flags, one-line help, example epilogue)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str, str]] = {
    "train": (
        _train_flags,
        "fine-tune a model",
        "  slimtune train --model smollm2-135m --data train.jsonl --method lora --out runs/a\n"
        "  slimtune train --config runs/a/config.yaml --lr 1e-3 --out runs/b\n"
        "  slimtune train --out runs/a --resume --max-steps 200",
    ),
    "eval": (
        _eval_flags,
        "loss, perplexity and exact match on a data set",
        "  slimtune eval --model smollm2-135m --adapter runs/a/adapter --data test.jsonl\n"
        "  slimtune eval --model smollm2-135m --data test.jsonl --json base.json",
    ),
    "generate": (
        _generate_flags,
        "generate text, streaming tokens",
        '  slimtune generate --model smollm2-135m --adapter runs/a/adapter --prompt "Hi"',
    ),
    "merge": (
        _merge_flags,
        "merge an adapter into a plain transformers directory",
        "  slimtune merge --model smollm2-135m --adapter runs/a/adapter --out merged/",
    ),
    "export": (
        _export_flags,
        "merged safetensors, GGUF or GGUF LoRA files",
        "  slimtune export --model smollm2-135m --adapter runs/a/adapter --format gguf "
        "--out a.gguf\n"
        "  slimtune export --model smollm2-135m --adapter runs/a/adapter --format gguf-lora "
        "--out a-lora.gguf",
    ),
    "compare": (
        _compare_flags,
        "train several methods side by side and write a report",
        "  slimtune compare --model smollm2-135m --data train.jsonl --methods lora,ia3,full "
        "--out cmp/\n"
        "  slimtune compare --model smollm2-135m --data train.jsonl --methods lora "
        "--sweep-ranks 1,8,64 --out sweep/",
    ),
    "inspect": (
        _inspect_flags,
        "what an adapter directory holds",
        "  slimtune inspect runs/a/adapter",
    ),
    "demo": (
        _demo_flags,
        "fine-tune the built-in model on the bundled data set",
        "  slimtune demo\n  slimtune demo --out runs/demo2 --quiet",
    ),
    "ui": (
        _ui_flags,
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

"""The flags of each command: one `<command>_flags(parser)` function per command, each putting
its flags into the groups of `groups` (model, data, method, training, output), every flag with
a help line. One name per concept across commands; an old spelling stays as a hidden alias
(`alias`) for a release. Imported only by parser.py.
"""

from __future__ import annotations

import argparse

from slimtune.export.quantize import LLAMACPP_TYPES
from slimtune.methods.table import method_names

METHODS = tuple(method_names())  # the rows of slimtune.methods.table
QUANTS = ("nf4", "fp4", "int8")
LORA_ALPHA = 8  # --alpha's default, the same as LoraConfig's and PEFT's lora_alpha
GROUPS = ("model", "data", "method", "training", "output")


def groups(p: argparse.ArgumentParser, **titles: str) -> dict[str, argparse._ArgumentGroup]:
    """The argument groups of a command, in --help's order; empty ones are not shown."""
    titles = {"model": "model (what to load)", "method": "method (what trains)", **titles}
    return {name: p.add_argument_group(titles.get(name, name)) for name in GROUPS}


def alias(group: argparse._ArgumentGroup, old: str, dest: str, **kwargs) -> None:
    """An old spelling of a flag, kept working for a release but not shown in --help."""
    group.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def num(g: argparse._ArgumentGroup, flag: str, help: str, kind: type = int, **kwargs) -> None:
    """A number flag (default None: resolved later, so `help` states the default)."""
    metavar = "N" if kind is int else "X"
    g.add_argument(flag, type=kind, default=None, metavar=metavar, help=help, **kwargs)


def model_flag(g: argparse._ArgumentGroup, required: bool = True) -> None:
    g.add_argument(
        "--model",
        required=required,
        metavar="MODEL",
        help="transformers directory, .gguf file or built-in name (smollm2-135m)"
        + ("" if required else "; required unless --config or --resume gives it"),
    )


def adapter_flag(g: argparse._ArgumentGroup, required: bool = False) -> None:
    g.add_argument(
        "--adapter",
        required=required,
        default=None,
        metavar="DIR",
        help="adapter directory (RUN/adapter of a train run)"
        + ("" if required else "; default: none, the base model alone"),
    )


def quant_flag(g: argparse._ArgumentGroup, help: str) -> None:
    g.add_argument("--quant", choices=QUANTS, default=None, help=help)


def quiet_flag(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--quiet", action="store_true", help="print only the result (no progress)")


def overwrite_flag(g: argparse._ArgumentGroup, what: str) -> None:
    g.add_argument("--overwrite", action="store_true", help=f"replace {what} already in --out")


def train_flags(p: argparse.ArgumentParser) -> None:
    g = groups(p)
    model_flag(g["model"], required=False)
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
    num(
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
    num(m, "--rank", "lora, qlora, dora: rank r (default: 8)")
    m.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"lora, qlora, dora: scaling = alpha / rank (default: {LORA_ALPHA}, as PEFT)",
    )
    num(m, "--dropout", "lora, qlora, dora: LoRA dropout (default: 0)", float)
    m.add_argument(
        "--target-modules",
        default=None,
        metavar="NAMES",
        help="comma-separated module name suffixes, or all-linear (lora, qlora, dora, ia3); "
        "adapter takes names only (default: PEFT's for the model type; qlora: all-linear)",
    )
    quant_flag(m, "qlora: how the frozen base is quantized (default: nf4)")
    num(m, "--num-virtual-tokens", "prompt: soft tokens (default: 20)")
    m.add_argument(
        "--prompt-init",
        default=None,
        metavar="TEXT",
        help="prompt: start from this text's embeddings (default: random)",
    )
    num(m, "--bottleneck-size", "adapter: bottleneck width (default: 64)")
    t = g["training"]
    num(t, "--max-steps", "optimizer steps (default: 100)")
    num(t, "--batch-size", "rows per micro-batch (default: 4)")
    num(t, "--grad-accum", "micro-batches per step (default: 1)")
    num(t, "--lr", "peak learning rate (default: 2e-4)", float)
    num(t, "--warmup-steps", "linear warmup from 0 (default: 0)")
    t.add_argument(
        "--schedule",
        choices=("linear", "cosine", "constant"),
        default=None,
        help="decay after warmup (default: cosine)",
    )
    num(t, "--seed", "data order, init and dropout (default: 0)")
    num(t, "--eval-every", "evaluate --eval-data every N steps (default: 0, at the end only)")
    num(t, "--nproc", "start torchrun with N processes (default: one process, no torchrun)")
    num(
        t,
        "--neftune-alpha",
        "NEFTune noise on input embeddings in training (default: 0, off)",
        float,
    )
    num(
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
    objective_flags(t)
    memory_flags(t)
    o = g["output"]
    o.add_argument(
        "--out", metavar="RUN", help="run directory (adapter/, checkpoints, metrics); required"
    )
    num(o, "--save-every", "checkpoint every N steps; 0: only the final adapter (default: 50)")
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
    overwrite_flag(o, "a run")
    quiet_flag(o)


def memory_flags(g: argparse._ArgumentGroup) -> None:
    """GPU memory: recomputation, its budget and the optimizer's state (training/memory.py)."""
    g.add_argument(
        "--checkpointing",
        default=None,
        metavar="auto|all|none|offload|F",
        help="decoder layers recomputed in backward: all, none, offload (all, inputs in CPU "
        "memory), a share F in (0, 1), or auto: on a GPU as many as --gpu-memory needs, "
        "measured on step 1 (default: auto; on the CPU auto is none)",
    )
    num(g, "--gpu-memory", "GiB the auto plan may use (default: 90%% of free GPU memory)", float)
    g.add_argument(
        "--optim",
        choices=("adamw", "paged", "8bit"),
        default=None,
        help="AdamW with fp32 state, paged to CPU memory, or in 8 bits (default: adamw)",
    )


def objective_flags(g: argparse._ArgumentGroup) -> None:
    """--objective and its settings (train and eval; also YAML keys of the same names)."""
    g.add_argument(
        "--objective",
        choices=("sft", "dpo", "orpo"),
        default=None,
        help="sft: learn the answers; dpo, orpo: prefer the chosen answer of "
        "{prompt, chosen, rejected} rows over the rejected one (default: sft)",
    )
    num(g, "--beta", "dpo: β, how far from the reference; higher: less (default: 0.1)", float)
    g.add_argument(
        "--dpo-loss",
        choices=("sigmoid", "ipo"),
        default=None,
        help="dpo: -log σ(β·margin), or IPO's squared loss (default: sigmoid)",
    )
    num(g, "--label-smoothing", "dpo: share of preferences assumed flipped (default: 0)", float)
    num(g, "--orpo-lambda", "orpo: weight of the odds-ratio term (default: 0.1)", float)


def eval_flags(p: argparse.ArgumentParser) -> None:
    g = groups(p)
    model_flag(g["model"])
    adapter_flag(g["model"])
    quant_flag(
        g["model"],
        "quantize the base model (default: as the adapter was trained, else unquantized)",
    )
    alias(g["model"], "--quantize", "quant", choices=QUANTS)
    g["model"].add_argument(
        "--force",
        action="store_true",
        help="score a QLoRA adapter on another --quant than it was trained on",
    )
    g["data"].add_argument("--data", required=True, metavar="FILE", help="JSONL or .txt to score")
    num(g["data"], "--max-length", "tokens per row (default: 1024)")
    num(g["training"], "--batch-size", "rows per forward pass (default: 8)")
    objective_flags(g["training"])
    g["output"].add_argument(
        "--json", default=None, metavar="FILE", help="also write the results here (default: none)"
    )
    quiet_flag(g["output"])


def generate_flags(p: argparse.ArgumentParser) -> None:
    g = groups(p, method="generation")
    model_flag(g["model"])
    adapter_flag(g["model"])
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


def merge_flags(p: argparse.ArgumentParser) -> None:
    g = groups(p)
    model_flag(g["model"])
    adapter_flag(g["model"], required=True)
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
    overwrite_flag(g["output"], "a merged model")


def export_flags(p: argparse.ArgumentParser) -> None:
    g = groups(p)
    model_flag(g["model"])
    adapter_flag(g["model"])
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
    overwrite_flag(o, "an export")


def compare_flags(p: argparse.ArgumentParser) -> None:
    g = groups(p)
    model_flag(g["model"])
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
    num(d, "--max-length", "tokens per row (default: 256)")
    m = g["method"]
    m.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated methods to train (the base model is always scored)",
    )
    num(m, "--rank", "rank of lora, qlora and dora (default: 8)")
    m.add_argument(
        "--sweep-ranks",
        dest="ranks",
        default=None,
        metavar="R,R,…",
        help="also train lora at each of these ranks, e.g. 1,2,8,64 (default: none)",
    )
    alias(m, "--ranks", "ranks")
    t = g["training"]
    num(t, "--max-steps", "optimizer steps per method (default: 40)")
    num(t, "--batch-size", "rows per step (default: 8)")
    num(
        t,
        "--lr",
        "peak learning rate of every method (default: each method's own: "
        "1e-3 lora/qlora/dora/adapter, 3e-2 ia3/prompt, 1e-4 full)",
        float,
    )
    num(t, "--seed", "data split, order, init (default: 0)")
    num(t, "--jobs", "training runs at a time (default: 1)")
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
    num(t, "--eval-every", "steps between validation evaluations (default: 10)")
    num(t, "--val-rows", "training rows kept apart for validation (default: an eighth)")
    num(t, "--seeds", "seeds per method at its best lr: mean and spread (default: 1)")
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
    overwrite_flag(o, "a report")
    quiet_flag(o)


def inspect_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="adapter directory (RUN/adapter) or merged model directory")


def demo_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("demo")
    g.add_argument(
        "--preference",
        action="store_true",
        help="the DPO demo: prefer one-sentence answers to chatty ones (out: runs/demo-preference)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="RUN", help="run directory (default: runs/demo)")
    overwrite_flag(o, "a run")
    quiet_flag(o)


def ui_flags(p: argparse.ArgumentParser) -> None:
    g = groups(p)
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

"""`slimtune demo` (`make demo`): teach the built-in SmolLM2-135M a new skill on a CPU.

The skill (data in slimtune/demo_data/, built by its build.py): read a sentence about
a person and answer with a fixed record, surname first:

    Meet Lena Hart: a 34-year-old baker from Oslo.   ->   Hart, Lena | 34 | baker | Oslo

The demo measures exact match on 40 held-out rows (names and cities never seen in
training) before and after a short LoRA run, shows a few answers side by side, and
leaves a full run directory (RUN/summary.json gains `before` and `after`). Like `train`, it
refuses a non-empty --out unless --overwrite, and then replaces only a run's own files.
`demo --preference` (demo_preference.py) shares its start, training run and report's end
(start_demo, train_demo, finish_demo, report_end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from slimtune.config import LoraConfig, TrainConfig

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
TRAIN = TrainConfig(
    max_steps=16, batch_size=8, lr=2e-3, warmup_steps=2, schedule="cosine", save_every=8,
    max_length=128, seed=0,
)  # fmt: skip
TRY_PROMPT = "Meet Ada Stone: a 41-year-old welder from Perth."


def demo_file(name: str) -> Path:
    return Path(str(resources.files("slimtune") / "demo_data" / name))


def pick_threads() -> int:
    """One thread on a busy machine, else torch's default (OMP_NUM_THREADS always wins).

    When other processes keep the cores busy, OpenMP threads that wait for each other
    waste most of their time: on a shared 2-core machine the demo took 527 CPU-seconds
    with 2 threads and 101 with 1.
    """
    if "OMP_NUM_THREADS" not in os.environ and os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5:
        torch.set_num_threads(1)
    return torch.get_num_threads()


@dataclass(frozen=True)
class DemoStart:
    """What both demos (this one and demo_preference.py) begin with; start_demo makes it."""

    args: argparse.Namespace
    model_name: str  # the model it loads (MODEL), named again in its run and report
    out: Path  # the run directory, checked as `train` checks it
    began: float  # time.perf_counter() at the start, for summary.json's demo_wall_time_s
    say: Callable[..., None]  # print, or nothing with --quiet
    model: Any  # as loaded, no adapter yet (add_adapter then wraps its layers in place)
    tokenizer: Any


def start_demo(
    args: argparse.Namespace, model_name: str, default_out: str, title: str
) -> DemoStart:
    """Check the run directory, quiet the libraries, pick the threads and load the model.

    `title` is the first line printed, with `{threads}` standing for the thread count.
    """
    from slimtune.cli.train import quiet_transformers
    from slimtune.models import load_model
    from slimtune.training.rundir import check_run_dir

    out = check_run_dir(args.out or default_out, resume=False, overwrite=args.overwrite)
    began = time.perf_counter()
    quiet_transformers(args.quiet)
    say = (lambda *a: None) if args.quiet else print
    threads = pick_threads()
    say(title.format(threads=threads))
    say(f"  loading {model_name} (the first time converts its GGUF file, about 20 s) …")
    model, tokenizer = load_model(model_name)
    return DemoStart(args, model_name, out, began, say, model, tokenizer)


def train_demo(
    start: DemoStart, model, train_data, config: TrainConfig, lora: LoraConfig, data_file: Path
) -> dict[str, Any]:
    """Train the demo's LoRA adapter into start.out (as `slimtune train`); returns the summary."""
    from slimtune.training.loop import train
    from slimtune.training.setup import adapter_saver

    args, name = start.args, start.model_name
    run_config = {"model": name, "data": str(data_file), "method": "lora", "rank": lora.r,
                  "alpha": lora.lora_alpha, "target_modules": ",".join(TARGETS)}  # fmt: skip
    return train(
        model, start.tokenizer, train_data, config, start.out, save_fn=adapter_saver(name),
        overwrite=args.overwrite, quiet=args.quiet, run_config=run_config,
    )  # fmt: skip


def finish_demo(
    start: DemoStart, summary: dict, before: dict, after: dict, report: Callable[..., str]
) -> int:
    """Add before, after and the wall time to RUN/summary.json and print the report."""
    from slimtune.atomic import write_json

    summary.update(before=before, after=after, demo_wall_time_s=time.perf_counter() - start.began)
    write_json(start.out / "summary.json", summary)
    print(report(before, after, summary, start.out))
    return 0


def held_out(model, tokenizer, data) -> dict[str, Any]:
    from slimtune.evaluate import evaluate

    result = evaluate(model, tokenizer, data, max_length=TRAIN.max_length, batch_size=20)
    return {k: result[k] for k in ("rows", "loss", "perplexity", "exact_match", "examples")}


def side_by_side(before: dict, after: dict, n: int = 4) -> str:
    lines = []
    for b, a in list(zip(before["examples"], after["examples"], strict=True))[:n]:
        question = b["prompt"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
        lines += [
            f"  question: {question}",
            f"    expected: {b['reference']}",
            f"    before:   {b['prediction'].strip()[:70]!s}",
            f"    after:    {a['prediction'].strip()[:70]!s}   {'ok' if a['match'] else 'x'}",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from slimtune.methods.table import add_adapter
    from slimtune.training.data import load_dataset

    title = "slimtune demo: teach SmolLM2-135M a fixed answer format (LoRA, CPU, {threads} thr.)"
    start = start_demo(args, MODEL, "runs/demo", title)
    model, tokenizer, say = start.model, start.tokenizer, start.say
    train_data = load_dataset(demo_file("train.jsonl"), tokenizer, TRAIN.max_length)
    test_data = load_dataset(demo_file("heldout.jsonl"), tokenizer, TRAIN.max_length)
    say(f"  held-out exact match before training ({len(test_data)} rows never trained on) …")
    before = held_out(model, tokenizer, test_data)
    torch.manual_seed(TRAIN.seed)
    model = add_adapter(model, LORA)
    say(
        f"  training LoRA r={LORA.r} on attention + MLP: {TRAIN.max_steps} steps × {TRAIN.batch_size} rows"
    )
    summary = train_demo(start, model, train_data, TRAIN, LORA, demo_file("train.jsonl"))
    after = held_out(model, tokenizer, test_data)
    return finish_demo(start, summary, before, after, report)


def command_name() -> str:
    """`slimtune` when it is on PATH, else the path of the one in this environment (.venv/bin/…)."""
    found = shutil.which("slimtune")
    local = Path(sys.executable).parent / "slimtune"
    if found or not local.exists():
        return "slimtune"
    return os.path.relpath(local) if not os.path.relpath(local).startswith("..") else str(local)


def report(before: dict, after: dict, summary: dict, out: Path) -> str:
    gain = 100 * (after["exact_match"] - before["exact_match"])
    return "\n".join(
        [
            "",
            f"held-out exact match: {100 * before['exact_match']:.1f}% -> "
            f"{100 * after['exact_match']:.1f}%  ({gain:+.1f} points; "
            f"loss {before['loss']:.3f} -> {after['loss']:.3f})",
            side_by_side(before, after),
            *report_end(summary, out, MODEL, TRY_PROMPT, f"--data {demo_file('heldout.jsonl')}"),
        ]
    )


def report_end(summary: dict, out: Path, model: str, prompt: str, eval_flags: str) -> list[str]:
    """The demos' last lines: what trained, how long it took, and two commands to try the run."""
    return [
        "",
        f"trained {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
        f"in {summary['wall_time_s']:.0f} s; whole demo {summary['demo_wall_time_s']:.0f} s; "
        f"run directory: {out}/",
        "try it:",
        f'  {command_name()} generate --model {model} --adapter {out}/adapter --prompt "{prompt}"',
        f"  {command_name()} eval --model {model} --adapter {out}/adapter {eval_flags}",
    ]

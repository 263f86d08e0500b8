"""`slimtune demo` (`make demo`): teach the built-in SmolLM2-135M a new skill on a CPU.

The skill (data in slimtune/demo_data/, built by its build.py): read a sentence about
a person and answer with a fixed record, surname first:

    Meet Lena Hart: a 34-year-old baker from Oslo.   ->   Hart, Lena | 34 | baker | Oslo

The demo measures exact match on 40 held-out rows (names and cities never seen in
training) before and after a short LoRA run, shows a few answers side by side, and
leaves a full run directory (RUN/summary.json gains `before` and `after`). Like `train`, it
refuses a non-empty --out unless --overwrite, and then replaces only a run's own files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
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
    from slimtune.atomic import write_json
    from slimtune.cli.train import quiet_transformers
    from slimtune.methods.table import add_adapter
    from slimtune.models import load_model
    from slimtune.training.data import load_dataset
    from slimtune.training.loop import train
    from slimtune.training.rundir import check_run_dir
    from slimtune.training.setup import adapter_saver

    out = check_run_dir(args.out or "runs/demo", resume=False, overwrite=args.overwrite)
    began = time.perf_counter()
    quiet_transformers(args.quiet)
    say = (lambda *a: None) if args.quiet else print
    threads = pick_threads()
    say(f"slimtune demo: teach SmolLM2-135M a fixed answer format (LoRA, CPU, {threads} thr.)")
    say(f"  loading {MODEL} (the first time converts its GGUF file, about 20 s) …")
    model, tokenizer = load_model(MODEL)
    train_data = load_dataset(demo_file("train.jsonl"), tokenizer, TRAIN.max_length)
    test_data = load_dataset(demo_file("heldout.jsonl"), tokenizer, TRAIN.max_length)
    say(f"  held-out exact match before training ({len(test_data)} rows never trained on) …")
    before = held_out(model, tokenizer, test_data)
    torch.manual_seed(TRAIN.seed)
    model = add_adapter(model, LORA)
    say(
        f"  training LoRA r={LORA.r} on attention + MLP: {TRAIN.max_steps} steps × {TRAIN.batch_size} rows"
    )
    run_config = {"model": MODEL, "data": str(demo_file("train.jsonl")), "method": "lora",
                  "rank": LORA.r, "alpha": LORA.lora_alpha, "target_modules": ",".join(TARGETS)}  # fmt: skip
    summary = train(
        model, tokenizer, train_data, TRAIN, out, save_fn=adapter_saver(MODEL),
        overwrite=args.overwrite, quiet=args.quiet, run_config=run_config,
    )  # fmt: skip
    after = held_out(model, tokenizer, test_data)
    summary.update(before=before, after=after, demo_wall_time_s=time.perf_counter() - began)
    write_json(out / "summary.json", summary)
    print(report(before, after, summary, out))
    return 0


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
            "",
            f"trained {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
            f"in {summary['wall_time_s']:.0f} s; whole demo {summary['demo_wall_time_s']:.0f} s; "
            f"run directory: {out}/",
            "try it:",
            f'  {command_name()} generate --model {MODEL} --adapter {out}/adapter --prompt "{TRY_PROMPT}"',
            f"  {command_name()} eval --model {MODEL} --adapter {out}/adapter --data {demo_file('heldout.jsonl')}",
        ]
    )

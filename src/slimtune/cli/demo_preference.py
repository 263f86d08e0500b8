"""`slimtune demo --preference`: teach the built-in SmolLM2-135M a preferred answer style with
DPO on a CPU, with one model in memory (the reference is the same model, adapter off).

The preference (data in slimtune/demo_data/, built by preference_build.py): answer a simple
question in one plain sentence, not in the padded, chatty style the model falls into:

    How many legs does a spider have?
      chosen:   A spider has eight legs.
      rejected: A spider has eight legs. There is a lot more to say about this, so … !

Both answers share their first sentence, so DPO's margin is decided where they part: the
end token after one sentence against more padding.

On 30 held-out pairs (questions never trained on, two kinds of them never asked in training)
it measures, before and after a short LoRA DPO run: the share of prompts whose greedy answer
is one sentence, and DPO's reward accuracy (how often the chosen answer gains more
log-probability over the reference than the rejected one). RUN/summary.json gains `before`
and `after`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from slimtune.cli.demo import (
    LORA,
    MODEL,
    demo_file,
    finish_demo,
    report_end,
    start_demo,
    train_demo,
)
from slimtune.config import TrainConfig

TRAIN = TrainConfig(
    objective="dpo", beta=0.1, max_steps=8, batch_size=4, lr=1e-3, warmup_steps=2,
    schedule="cosine", save_every=4, max_length=160, seed=0,
)  # fmt: skip
BUDGET = 28  # new tokens per held-out answer: enough for one sentence, not for a ramble
TRY_PROMPT = "How many legs does a zebra have?"


def one_sentence(text: str) -> bool:
    """The preferred style: one finished sentence (a '.', '!' or '?' only at its end)."""
    text = text.strip()
    return bool(text) and text[-1] in ".!?" and len(re.findall(r"[.!?](?:\s|$)", text)) == 1


def held_out(model, tokenizer, data, loss) -> dict[str, Any]:
    """Greedy answers to the held-out prompts, their style, and DPO's rewards."""
    from slimtune.evaluate import greedy_continuations
    from slimtune.training.data import encode, render
    from slimtune.training.preference_loss import preference_eval

    questions = [row["prompt"] for row in data.rows]
    prompts = [encode(tokenizer, render(tokenizer, q, generation_prompt=True)) for q in questions]
    answers = greedy_continuations(model, tokenizer, prompts, [BUDGET] * len(prompts), 30)
    rewards = preference_eval(model, data, loss, batch_size=8)
    examples = [
        {"question": q[-1]["content"], "answer": a, "one_sentence": one_sentence(a)}
        for q, a in zip(questions, answers, strict=True)
    ]
    return {
        "pairs": len(data),
        "one_sentence": sum(e["one_sentence"] for e in examples) / len(examples),
        "reward_accuracy": rewards["rewards/accuracy"],
        "reward_margin": rewards["rewards/margin"],
        "loss": rewards["loss"],
        "examples": examples,
    }


def run(args: argparse.Namespace) -> int:
    from slimtune.methods.table import add_adapter
    from slimtune.training.preference import load_preference_data
    from slimtune.training.preference_loss import objective_loss

    title = ("slimtune demo --preference: teach SmolLM2-135M to answer in one plain sentence "
             "(DPO, LoRA, CPU, {threads} thr.)")  # fmt: skip
    start = start_demo(args, MODEL, "runs/demo-preference", title)
    model, tokenizer, say = start.model, start.tokenizer, start.say
    train_file, test_file = (
        demo_file("preference_train.jsonl"),
        demo_file("preference_heldout.jsonl"),
    )
    train_data = load_preference_data(train_file, tokenizer, TRAIN.max_length)
    test_data = load_preference_data(test_file, tokenizer, TRAIN.max_length)
    torch.manual_seed(TRAIN.seed)
    model = add_adapter(model, LORA)  # B = 0: the model still answers as its base
    loss = objective_loss(model, TRAIN, torch.device("cpu"))
    say(f"  held-out answers before training ({len(test_data)} questions never trained on) …")
    before = held_out(model, tokenizer, test_data, loss)
    say(f"  DPO, β={TRAIN.beta}, LoRA r={LORA.r} on attention + MLP: {TRAIN.max_steps} steps × "
        f"{TRAIN.batch_size} pairs; the reference is the same model with the adapter off")  # fmt: skip
    summary = train_demo(start, model, train_data, TRAIN, LORA, train_file)
    after = held_out(model, tokenizer, test_data, loss)
    return finish_demo(start, summary, before, after, report)


def side_by_side(before: dict, after: dict, n: int = 4) -> str:
    lines = []
    pairs = list(zip(before["examples"], after["examples"], strict=True))
    changed = [p for p in pairs if not p[0]["one_sentence"]] + pairs  # rambling ones first
    for b, a in changed[:n]:
        lines += [
            f"  question: {b['question']}",
            f"    before:   {b['answer'].strip()[:90]}",
            f"    after:    {a['answer'].strip()[:90]}",
        ]
    return "\n".join(lines)


def report(before: dict, after: dict, summary: dict, out: Path) -> str:
    gain = 100 * (after["one_sentence"] - before["one_sentence"])
    data = demo_file("preference_heldout.jsonl")
    return "\n".join(
        [
            "",
            f"held-out answers in one sentence: {100 * before['one_sentence']:.1f}% -> "
            f"{100 * after['one_sentence']:.1f}%  ({gain:+.1f} points)",
            f"held-out reward accuracy: {100 * before['reward_accuracy']:.1f}% -> "
            f"{100 * after['reward_accuracy']:.1f}%  (margin {before['reward_margin']:.2f} -> "
            f"{after['reward_margin']:.2f}; DPO loss {before['loss']:.3f} -> {after['loss']:.3f})",
            side_by_side(before, after),
            *report_end(summary, out, MODEL, TRY_PROMPT, f"--objective dpo --data {data}"),
        ]
    )

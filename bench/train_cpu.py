"""CPU training speed: slimtune's trainer vs a plain PyTorch loop over PEFT vs transformers' Trainer.

Same model (SmolLM2-135M, fp32), same LoRA (r=16, alpha=32 on q,k,v,o), same rows
(batch 4 × 256 tokens, no padding), in one process; once on text (every position has a
loss) and once on prompt/completion rows whose prompt is the first half of the tokens.
Each contestant runs `--warmup` untimed steps, then `--steps` timed ones.

    python bench/train_cpu.py [--steps 5] [--warmup 1] [--threads N] [--clock wall|cpu] [--repeat R]

Prints tokens/s and the ratio to the plain loop (higher is faster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, LENGTH, RANK = 4, 256, 16
CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process)


def make_rows(kind: str, n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """n rows of LENGTH random token ids; prompt/completion rows have no loss on the first half."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(100, vocab, (LENGTH,), generator=generator).tolist()
        labels = list(ids) if kind == "text" else [-100] * (LENGTH // 2) + ids[LENGTH // 2 :]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def fresh_model():
    from slimtune.models import load_model

    model, tokenizer = load_model(MODEL)
    model.train()
    return model, tokenizer


def slimtune_seconds(rows, max_steps: int) -> float:
    """Clock time of a whole `train()` call of max_steps steps (model setup excluded)."""
    import slimtune as st
    from slimtune.config import TrainConfig
    from slimtune.training.data import Dataset, Example
    from slimtune.training.loop import train

    model, tokenizer = fresh_model()
    torch.manual_seed(0)
    model = st.add_adapter(
        model, st.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    )
    data = Dataset("bench", "text", [Example(r["input_ids"], r["labels"]) for r in rows], [])
    config = TrainConfig(max_steps=max_steps, batch_size=BATCH, lr=1e-4, save_every=0,
                         max_length=LENGTH, precision="fp32", device="cpu")  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        began = CLOCK()
        train(model, tokenizer, data, config, Path(out) / "run", quiet=True,
              save_fn=lambda m, d: None)  # fmt: skip
        return CLOCK() - began


def run_slimtune(rows, steps: int, warmup: int) -> float:
    """The trainer as users run it: (warmup + steps) minus (warmup) steps, so set-up cancels."""
    seconds = slimtune_seconds(rows, warmup + steps) - slimtune_seconds(rows, warmup)
    return steps * BATCH * LENGTH / seconds


def batches(rows):
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        yield {
            "input_ids": torch.tensor([r["input_ids"] for r in chunk]),
            "labels": torch.tensor([r["labels"] for r in chunk]),
        }


def peft_model():
    from peft import LoraConfig, get_peft_model

    model, _ = fresh_model()
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_plain_peft(rows, steps: int, warmup: int) -> float:
    model = peft_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for batch in batches(rows[: (warmup + steps) * BATCH]):
        began = CLOCK()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(CLOCK() - began)
    return steps * BATCH * LENGTH / sum(times[warmup:])


def run_trainer(rows, steps: int, warmup: int) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(CLOCK())

    model = peft_model()
    dataset = [{k: torch.tensor(v) for k, v in r.items()} for r in rows[: (warmup + steps) * BATCH]]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=warmup + steps,
            learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=default_data_collator, callbacks=[Clock()])  # fmt: skip
        trainer.train()
    # stamps[warmup - 1] ends the last untimed step
    return steps * BATCH * LENGTH / (stamps[-1] - stamps[warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds; each contestant's best counts"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: count this process's CPU seconds (steadier on a busy machine)",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported once, outside every timed region)

    vocab = fresh_model()[0].config.vocab_size
    contestants = {"plain loop + PEFT": run_plain_peft, "slimtune": run_slimtune,
                   "Trainer + PEFT": run_trainer}  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    for round_ in range(args.repeat):  # rounds interleave the contestants; the best round counts
        for kind in ("text", "prompt/completion"):
            rows = make_rows(kind, (args.warmup + args.steps) * BATCH, vocab)
            for name, fn in contestants.items():
                speed = fn(rows, args.steps, args.warmup)
                best = max(speed, results.setdefault(name, {}).get(kind, 0.0))
                results[name][kind] = best
                print(
                    f"  round {round_ + 1} {kind:18s} {name:18s} {speed:8.1f} tokens/s", flush=True
                )
    print(f"\nSmolLM2-135M, LoRA r={RANK} on q,k,v,o, batch {BATCH} x {LENGTH}, fp32, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps, best of {args.repeat}, {args.clock} clock")  # fmt: skip
    print(f"| {'':18s} | text tok/s | vs plain | prompt/completion tok/s | vs plain |")
    print(f"|{'-' * 20}|-----------:|---------:|------------------------:|---------:|")
    base = results["plain loop + PEFT"]
    for name, res in results.items():
        t, p = res["text"], res["prompt/completion"]
        print(f"| {name:18s} | {t:10.1f} | {t / base['text']:7.2f}x | {p:23.1f} | "
              f"{p / base['prompt/completion']:7.2f}x |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

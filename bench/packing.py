"""Packed vs padded training throughput, through the shipped command.

Runs `slimtune train` (in this process, as a user would run it) on the demo data set
(short chat rows, SmolLM2-135M, LoRA) with the same batch size and --max-length, once
padding each batch to its longest row (the default, rows grouped by length) and once
with --packing; alternating, `--repeat` times each. Prints the median tokens/s (real
tokens, padding not counted; from RUN/summary.json) and the ratio packed / padded.

    python bench/packing.py [--steps 8] [--batch-size 8] [--max-length 512] [--repeat 2] [--threads N]

On a CPU, --threads 1 keeps the timing sane on a busy machine (OpenMP threads that wait
for each other spin); tokens/s are then those of one core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from slimtune.cli.main import main

DEMO = Path(__file__).resolve().parents[1] / "src" / "slimtune" / "demo_data" / "train.jsonl"


def run(out: Path, args: argparse.Namespace, packing: bool) -> dict:
    argv = ["train", "--model", args.model, "--data", str(DEMO), "--out", str(out),
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--save-every", "0", "--quiet",
            "--overwrite", *(["--packing"] if packing else [])]  # fmt: skip
    if main(argv) != 0:
        raise SystemExit(f"slimtune {' '.join(argv)} failed")
    return json.loads((out / "summary.json").read_text())


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    speeds: dict[str, list[float]] = {"padded": [], "packed": []}
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for name in speeds:
                summary[name] = run(Path(tmp) / name, args, name == "packed")
                speeds[name].append(summary[name]["tokens_per_s"])
    device = summary["packed"]["device"]
    threads = f" ({args.threads} thread)" if args.threads and device == "cpu" else ""
    print(f"demo data ({DEMO.name}), {args.model}, LoRA, batch {args.batch_size} x "
          f"--max-length {args.max_length}, {args.steps} steps, {device}{threads}, "
          f"median of {args.repeat}")  # fmt: skip
    print(f"{'':8} {'tokens/step':>12} {'tokens/s':>10}")
    for name, values in speeds.items():
        per_step = summary[name]["train_tokens"] / summary[name]["steps"]
        print(f"{name:8} {per_step:12,.0f} {statistics.median(values):10,.0f}")
    ratio = statistics.median(speeds["packed"]) / statistics.median(speeds["padded"])
    print(f"packed / padded tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main_bench()

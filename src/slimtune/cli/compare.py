"""`slimtune compare`: train several methods the same way and write a report.

    slimtune compare --model smollm2-135m --data train.jsonl --eval-data heldout.jsonl \\
        --methods lora,qlora,dora,ia3,prompt,adapter,full --sweep-ranks 1,2,8,64 --out DIR

Without --eval-data, a fifth of the --data rows (chosen with the seed) is held out.
Writes DIR/report.md, DIR/report.json and DIR/*.png (see slimtune.compare).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from slimtune.errors import SlimtuneError


def split_rows(data: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """Hold out a fifth of a JSONL file's rows: (DIR/data/train.jsonl, DIR/data/heldout.jsonl)."""
    if data.suffix != ".jsonl":
        raise SlimtuneError(f"--data {data}: give --eval-data, or a .jsonl file to split")
    rows = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) < 5:
        raise SlimtuneError(f"--data {data} has {len(rows)} rows: at least 5 are needed to split")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = len(rows) // 5
    held, train = sorted(order[:cut]), sorted(order[cut:])
    (out / "data").mkdir(parents=True, exist_ok=True)
    paths = out / "data" / "train.jsonl", out / "data" / "heldout.jsonl"
    for path, picked in zip(paths, (train, held), strict=True):
        path.write_text("".join(rows[i] + "\n" for i in picked), encoding="utf-8")
    return paths


def run(args: argparse.Namespace) -> int:
    from slimtune.atomic import prepare_out_dir
    from slimtune.compare.report import table
    from slimtune.compare.run import CompareSettings, compare, parse_methods, parse_ranks
    from slimtune.models import resolve_model_path

    methods, ranks = parse_methods(args.methods), parse_ranks(args.ranks)
    for name in ("max_steps", "batch_size", "max_length", "rank", "jobs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SlimtuneError(
                f"--{name.replace('_', '-')} {value} is not accepted: an integer > 0"
            )
    if args.rank is not None and not {"lora", "qlora", "dora"} & set(methods):
        raise SlimtuneError(f"--rank {args.rank} needs lora, qlora or dora in --methods")
    resolve_model_path(args.model)
    for path in filter(None, (args.data, args.eval_data)):
        if not Path(path).is_file():
            raise SlimtuneError(f"data file {path} does not exist")
    out = prepare_out_dir(args.out, args.overwrite)
    seed = 0 if args.seed is None else args.seed
    data, eval_data = Path(args.data), args.eval_data
    if eval_data is None:
        data, eval_data = split_rows(data, out, seed)
    given = {"max_steps": args.max_steps, "batch_size": args.batch_size,
             "max_length": args.max_length, "rank": args.rank, "jobs": args.jobs}  # fmt: skip
    if args.lr is not None and not 0.0 < args.lr <= 1.0:
        raise SlimtuneError(f"--lr {args.lr} is not accepted: a number in (0, 1]")
    lr = {} if args.lr is None else dict.fromkeys(methods, args.lr)
    settings = CompareSettings(
        model=str(args.model), data=str(data), eval_data=str(eval_data), methods=methods,
        ranks=ranks, seed=seed, lr=lr, **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    report = compare(settings, out, quiet=args.quiet, keep_runs=args.keep_runs)
    if not args.quiet:
        print(table(report))
        print(f"report: {out / 'report.md'}")
    return 0

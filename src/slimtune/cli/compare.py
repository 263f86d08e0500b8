"""`slimtune compare`: train several methods the same way and write a report.

    slimtune compare --model smollm2-135m --data train.jsonl --eval-data heldout.jsonl \\
        --methods lora,qlora,dora,ia3,prompt,adapter,full --sweep-ranks 1,2,8,64 --out DIR \\
        --lr-sweep --until-plateau 3 --seeds 3

Without --eval-data, a fifth of the --data rows (chosen with the seed) is held out.
--lr-sweep and --until-plateau carve validation rows (--val-rows, default an eighth) from the
training rows: the sweep picks each method's lr by their loss, the plateau stops training.
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
    from slimtune.compare.run import compare
    from slimtune.compare.settings import (
        CompareSettings,
        parse_lr_factors,
        parse_methods,
        parse_ranks,
    )
    from slimtune.models import resolve_model_path

    methods, ranks = parse_methods(args.methods), parse_ranks(args.ranks)
    lr_factors = parse_lr_factors(getattr(args, "lr_sweep", None))
    for name in ("max_steps", "batch_size", "max_length", "rank", "jobs", "seeds", "eval_every",
                 "val_rows", "until_plateau"):  # fmt: skip
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise SlimtuneError(
                f"--{name.replace('_', '-')} {value} is not accepted: an integer > 0"
            )
    device = getattr(args, "device", None)
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise SlimtuneError(f"--device {device!r} is not accepted: cpu, cuda or cuda:N")
    if args.rank is not None and not {"lora", "qlora", "dora"} & set(methods):
        raise SlimtuneError(f"--rank {args.rank} needs lora, qlora or dora in --methods")
    resolve_model_path(args.model)
    hard = getattr(args, "hard_eval_data", None)
    for path in filter(None, (args.data, args.eval_data, hard)):
        if not Path(path).is_file():
            raise SlimtuneError(f"data file {path} does not exist")
    if args.lr is not None and not 0.0 < args.lr <= 1.0:
        raise SlimtuneError(f"--lr {args.lr} is not accepted: a number in (0, 1]")
    out = prepare_out_dir(args.out, args.overwrite)
    seed = 0 if args.seed is None else args.seed
    data, eval_data = Path(args.data), args.eval_data
    if eval_data is None:
        data, eval_data = split_rows(data, out, seed)
    patience = getattr(args, "until_plateau", None) or 0
    val_rows = getattr(args, "val_rows", None)
    if val_rows is None and (lr_factors or patience):  # an eighth of the rows, at least 8
        val_rows = max(8, _count_rows(data) // 8)
    given = {"max_steps": args.max_steps, "batch_size": args.batch_size,
             "max_length": args.max_length, "rank": args.rank, "jobs": args.jobs,
             "seeds": getattr(args, "seeds", None), "eval_every": getattr(args, "eval_every", None),
             "val_rows": val_rows}  # fmt: skip
    lr = {} if args.lr is None else dict.fromkeys(methods, args.lr)
    settings = CompareSettings(
        model=str(args.model), data=str(data), eval_data=str(eval_data), hard_eval_data=hard,
        methods=methods, ranks=ranks, seed=seed, lr=lr, lr_factors=lr_factors,
        patience=patience, device=device, **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    report = compare(settings, out, quiet=args.quiet, keep_runs=args.keep_runs)
    if not args.quiet:
        print(table(report))
        print(f"report: {out / 'report.md'}")
    return 0


def _count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())

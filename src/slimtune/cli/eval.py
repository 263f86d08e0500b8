"""`slimtune eval`: loss, perplexity and exact match of a model (and adapter) on a data set.

slimtune eval --model smollm2-135m --adapter runs/a/adapter --data test.jsonl --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.evaluate import load_for_inference, trained_quantization


def table(result: dict[str, Any]) -> str:
    """A small text table of one evaluation."""
    head = ["data", "rows", "tokens", "loss", "perplexity"]
    cells = [
        Path(result["data"]).name,
        str(result["rows"]),
        str(result["tokens"]),
        f"{result['loss']:.4f}",
        f"{result['perplexity']:.2f}",
    ]
    if "exact_match" in result:
        head.append("exact match")
        cells.append(f"{100 * result['exact_match']:.1f}%")
    widths = [max(len(h), len(c)) for h, c in zip(head, cells, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()
    return line + "\n" + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


PREFERENCE_KEYS = ("objective", "beta", "dpo_loss", "label_smoothing", "orpo_lambda")


def objective_config(args: argparse.Namespace):
    """A TrainConfig holding --objective and its settings (checked as `train` checks them)."""
    from slimtune.cli.train import source_message
    from slimtune.config import TrainConfig

    given = {key: getattr(args, key) for key in PREFERENCE_KEYS if getattr(args, key) is not None}
    try:
        return TrainConfig(**given)
    except SlimtuneError as exc:
        raise SlimtuneError(source_message(str(exc), [("flag", given)])) from None


def run_preference(args: argparse.Namespace, config, max_length: int) -> int:
    """eval --objective dpo|orpo: loss, reward accuracy and margin on held-out pairs.

    DPO's rewards compare the adapter with its base: β (log π(y|x) - log π_base(y|x)).
    """
    from slimtune.atomic import write_json
    from slimtune.models import load_tokenizer
    from slimtune.training.preference import load_preference_data
    from slimtune.training.preference_loss import objective_loss, preference_eval

    if config.objective == "dpo" and args.adapter is None:
        raise SlimtuneError(
            "eval --objective dpo scores an adapter against its base: give --adapter"
        )
    tokenizer = load_tokenizer(args.model)
    data = load_preference_data(args.data, tokenizer, max_length, quiet=args.quiet)
    model, _ = load_for_inference(args.model, args.adapter, args.quant)
    device = next(model.parameters()).device
    result = preference_eval(
        model, data, objective_loss(model, config, device, quiet=True), args.batch_size or 8
    )
    result = {"data": str(args.data), "pairs": len(data), "objective": config.objective,
              **result, "model": str(args.model), "adapter": args.adapter}  # fmt: skip
    accuracy, margin = result["rewards/accuracy"], result["rewards/margin"]
    print(f"{Path(args.data).name}: {len(data)} pairs, {config.objective} loss "
          f"{result['loss']:.4f}, reward accuracy {100 * accuracy:.1f}%, margin {margin:.4f}")  # fmt: skip
    if args.json:
        write_json(Path(args.json), result)
    return 0


def run(args: argparse.Namespace) -> int:
    from slimtune.atomic import write_json
    from slimtune.cli.train import quiet_transformers
    from slimtune.evaluate import evaluate, load_for_eval
    from slimtune.models import load_tokenizer

    max_length = args.max_length or 1024
    if max_length <= 0 or (args.batch_size is not None and args.batch_size <= 0):
        raise SlimtuneError("--max-length and --batch-size must be integers > 0")
    quiet_transformers(args.quiet)
    objective = objective_config(args)  # --objective and its settings, checked
    if objective.objective != "sft":
        return run_preference(args, objective, max_length)
    from slimtune.training.templates import adapter_chat_template

    data_tokenizer = load_tokenizer(args.model)
    adapter_chat_template(data_tokenizer, args.adapter)  # as trained (--chat-template)
    data = load_for_eval(Path(args.data), data_tokenizer, max_length, args.quiet)
    model, tokenizer = load_for_inference(args.model, args.adapter, args.quant, args.force)
    result = evaluate(
        model, tokenizer, data, max_length=max_length, batch_size=args.batch_size or 8
    )
    trained = trained_quantization(args.adapter) or {}
    result.update(
        model=str(args.model), adapter=args.adapter, quantize=args.quant or trained.get("quant")
    )
    print(table(result))
    if args.json:
        write_json(Path(args.json), result)
    return 0

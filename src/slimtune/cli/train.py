"""`slimtune train`: fine-tune a model and write a run directory.

    slimtune train --model smollm2-135m --data train.jsonl --method lora --out runs/a
    slimtune train --config run.yaml --lr 1e-3          # flags override the file
    slimtune train --out runs/a --resume                # continue from the last checkpoint

The configuration is resolved in layers: RUN/config.yaml (when resuming), then
--config FILE, then the flags given. Every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slimtune.cli.applies import check_train_options
from slimtune.cli.yaml_lines import yaml_line
from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.file_checks import read_text_file

RUN_KEYS = ("model", "data", "eval_data", "out", "method", "rank", "alpha", "dropout",
            "target_modules", "quant", "num_virtual_tokens", "prompt_init",
            "bottleneck_size", "chat_template")  # fmt: skip
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
FLAG_ONLY = ("resume", "overwrite", "quiet", "config", "nproc", "command")


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise SlimtuneError(f"--config {path} does not exist")
    try:
        loaded = yaml.safe_load(read_text_file(path, "--config")) or {}
    except RecursionError:
        raise SlimtuneError(f"{path}: nested too deeply to be a config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SlimtuneError(
            f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    if not isinstance(loaded, dict):
        raise SlimtuneError(f"{path}: a config file must be a mapping of option: value")
    check_keys(loaded, path)
    return loaded


# names other tools use for the same options, offered as close matches
ALIASES = {"learning_rate": "lr", "r": "rank", "lora_r": "rank", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "gradient_accumulation_steps": "grad_accum",
           "per_device_train_batch_size": "batch_size", "steps": "max_steps",
           "warmup": "warmup_steps", "lr_scheduler_type": "schedule", "output_dir": "out",
           "model_name_or_path": "model", "dataset": "data", "max_seq_length": "max_length"}  # fmt: skip


def check_keys(options: dict[str, Any], source: Path) -> None:
    known = RUN_KEYS + TRAIN_KEYS
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), [*known, *ALIASES], n=3, cutoff=0.6)
            close = list(dict.fromkeys(ALIASES.get(name, name) for name in close))
            hint = (
                f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(known)}"
            )
            raise SlimtuneError(f"{source}: unknown key {key!r}; {hint}")


def layers(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(source, options) in the order they apply: RUN/config.yaml, --config FILE, the flags.

    A source is a YAML file's path or "flag"; later layers override earlier ones.
    """
    flags = {k: v for k, v in vars(args).items() if k not in FLAG_ONLY and v is not None}
    found: list[tuple[str, dict[str, Any]]] = []
    saved = Path(flags["out"]) / "config.yaml" if args.resume and "out" in flags else None
    if saved is not None and saved.is_file():
        found.append((str(saved), read_yaml(saved)))
    if args.config:
        found.append((str(args.config), read_yaml(Path(args.config))))
    return [*found, ("flag", flags)]


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], TrainConfig]:
    """(run options, TrainConfig) from RUN/config.yaml, --config and the flags, in that order."""
    options: dict[str, Any] = {"method": "lora"}
    for _, layer in layers(args):
        options.update(layer)
    if args.resume and args.overwrite:
        raise SlimtuneError("--resume continues a run and --overwrite replaces it: give one")
    if args.resume and options.get("out") and not (Path(options["out"]) / "config.yaml").is_file():
        raise SlimtuneError(f"--resume: {options['out']} holds no run (no config.yaml there)")
    for key in ("model", "data", "out"):
        if not options.get(key):
            raise SlimtuneError(f"train needs --{key} (or '{key}:' in the --config file)")
    with naming_sources(args):
        config = TrainConfig(**{k: options[k] for k in TRAIN_KEYS if k in options})
    run = {k: options.get(k) for k in RUN_KEYS}
    check_run_types(run, layers(args))
    check_train_options(run, config, layers(args))  # no silent no-ops (applies.py)
    if config.packing and run["method"] == "prompt":
        raise SlimtuneError(
            "--packing does not work with --method prompt: its soft tokens lead every row"
        )
    return run, config


RUN_TYPES = {"rank": (int,), "num_virtual_tokens": (int,), "bottleneck_size": (int,),
             "alpha": (int, float), "dropout": (int, float), "target_modules": (str, list)}  # fmt: skip


def check_run_types(run: dict[str, Any], sources: list[tuple[str, dict[str, Any]]]) -> None:
    """Each run option has its type (a YAML file can hold anything); the others are strings."""
    from slimtune.cli.applies import given

    for key, value in run.items():
        kinds = RUN_TYPES.get(key, (str,))
        bad = value is not None and (isinstance(value, bool) or not isinstance(value, kinds))
        if bad or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
            expected = " or ".join("a list of names" if k is list else k.__name__ for k in kinds)
            raise SlimtuneError(
                f"{given(key, value, sources)} is not accepted: expected {expected}"
            )


# config fields that a flag of another name sets (slimtune.methods' recipes build them)
OPTION_OF_FIELD = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
                   "prompt_tuning_init_text": "prompt_init"}  # fmt: skip


@contextlib.contextmanager
def naming_sources(args: argparse.Namespace) -> Iterator[None]:
    """Re-raise a config's error ('LoraConfig.r=0 is not accepted: …') naming what the user
    typed: the flag (`--rank 0 is not accepted: …`) or the YAML file, line and key."""
    try:
        yield
    except SlimtuneError as exc:
        raise SlimtuneError(source_message(str(exc), layers(args))) from None
    except TypeError as exc:
        raise SlimtuneError(f"bad training option: {exc}") from None


def source_message(message: str, sources: list[tuple[str, dict[str, Any]]]) -> str:
    found = re.match(r"(\w+)\.(\w+)=(.*?) is not accepted", message)
    if not found:
        return message
    key = OPTION_OF_FIELD.get(found.group(2), found.group(2))
    rest = " is not accepted" + message[found.end() :]
    for source, options in reversed(sources):
        if key not in options:
            continue
        if source == "flag":
            return f"--{key.replace('_', '-')} {found.group(3)}{rest}"
        line = yaml_line(Path(source), key)
        return f"{source}{f':{line}' if line else ''}: {key}: {found.group(3)}{rest}"
    return message


def quiet_transformers(quiet: bool) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if quiet:
        transformers.utils.logging.set_verbosity_error()


def run(args: argparse.Namespace) -> int:
    from slimtune.training import distributed

    if getattr(args, "nproc", None) is not None:  # check here: one line, not one per process
        from slimtune.training.loop import check_run_dir

        run_options, config = resolve(args)
        if config.objective != "sft":
            raise SlimtuneError(f"--objective {config.objective} runs in one process: drop --nproc")
        check_run_dir(run_options["out"], args.resume, args.overwrite)
        return distributed.launch(args)
    from slimtune.cli.run_config import recorded_options
    from slimtune.models import load_model, load_tokenizer
    from slimtune.training.loop import check_run_dir, read_data, train
    from slimtune.training.setup import prepare_method
    from slimtune.training.templates import saving_chat_template, use_chat_template

    run_options, config = resolve(args)
    if distributed.init_from_env(config.device) and not distributed.is_main():
        args.quiet = True  # under torchrun only rank 0 prints
    out = check_run_dir(run_options["out"], args.resume, args.overwrite)
    quiet_transformers(args.quiet)
    tokenizer = load_tokenizer(run_options["model"])
    spec = run_options["chat_template"]  # --chat-template (training/templates.py)
    template = use_chat_template(tokenizer, spec) if spec else None
    data = read_data(run_options["data"], tokenizer, config, args.quiet)  # rows, or pairs
    eval_data = None
    if run_options["eval_data"]:
        eval_data = read_data(run_options["eval_data"], tokenizer, config, quiet=True)
    model, tokenizer = load_model(run_options["model"], **load_options(run_options, config))
    torch.manual_seed(config.seed)
    options = {**run_options, "base_model": str(run_options["model"])}
    with naming_sources(args):
        model, save_fn = prepare_method(model, run_options["method"], options)
    if template:  # the loop's tokenizer renders with it; it is saved beside the weights
        tokenizer.chat_template = template
        save_fn = saving_chat_template(save_fn, template)
    try:
        summary = train(
            model, tokenizer, data, config, out, save_fn=save_fn, eval_data=eval_data,
            resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
            run_config=recorded_options(model, run_options),  # resolved, absolute (run_config.py)
        )  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        raise SlimtuneError(out_of_memory(config)) from None
    if not args.quiet:
        print(report(summary, out))
    distributed.shutdown()
    return 0


def load_options(run_options: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """How to load the base: QLoRA quantizes each weight as it arrives (CPU too); a single GPU
    gets the weights streamed straight to it in the autocast dtype (bf16)."""
    from slimtune.training import distributed
    from slimtune.training.loop import resolve_device

    quantize = (run_options.get("quant") or "nf4") if run_options["method"] == "qlora" else None
    device, autocast = resolve_device(config)
    if device.type == "cpu" or distributed.is_distributed():
        return {"quantize": quantize}
    return {"quantize": quantize, "device": device, "dtype": autocast or torch.float32}


def out_of_memory(config: TrainConfig) -> str:
    """The one line for a GPU that ran out of memory: what was asked, and what would fit."""
    asked = f"--checkpointing {config.checkpointing}"
    if config.gpu_memory is not None:
        asked += f" --gpu-memory {config.gpu_memory:g}"
    return (
        f"out of GPU memory training with {asked}, --batch-size {config.batch_size}, "
        f"--max-length {config.max_length}: try --checkpointing offload (or all), a lower "
        "--gpu-memory, or a smaller --batch-size or --max-length"
    )


def report(summary: dict[str, Any], out: Path) -> str:
    lines = [
        f"trained {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
        f"({summary['trainable_percent']:.2f}%) for {summary['steps']} steps in "
        f"{summary['wall_time_s']:.0f} s ({summary['tokens_per_s']:,.0f} tokens/s)",
        f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
        + (
            f", eval loss {summary['eval_loss']:.4f}"
            if summary.get("eval_loss") is not None
            else ""
        ),
        f"adapter: {out / 'adapter'}   run: {out}",
    ]
    return "\n".join(lines)

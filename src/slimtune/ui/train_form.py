"""The Train tab's form -> the `slimtune train` command it stands for, checked first.

    form values ─► paths resolved inside the root ─► TrainConfig / method config built
                ─► ["train", "--model", M, "--data", D, …]  (and the same as YAML)

Defaults are the command line's: a field left empty is not passed, so `slimtune train`
fills it in, and the numbers are checked by the same dataclasses (TrainConfig,
LoraConfig, …) before anything starts. Errors name the flag, as the command line does.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from slimtune.config import BottleneckConfig, LoraConfig, PromptTuningConfig, TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.methods.table import method_names
from slimtune.ui.paths import Root
from slimtune.ui.runs import checkpoint_steps

TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
# the form's number fields: (key, label, int or float), shown with the CLI's defaults
MAIN = [("max_steps", "steps", int), ("batch_size", "batch size", int),
        ("lr", "learning rate", float), ("max_length", "max length (tokens)", int),
        ("save_every", "checkpoint every (steps)", int)]  # fmt: skip
METHOD = [("rank", "rank (lora, qlora, dora)", int), ("alpha", "alpha (lora, qlora, dora)", float)]
ADVANCED = [("grad_accum", "gradient accumulation", int),
            ("warmup_steps", "warmup steps", int), ("seed", "seed", int),
            ("eval_every", "evaluate every (steps; 0: at the end)", int),
            ("dropout", "LoRA dropout", float),
            ("num_virtual_tokens", "virtual tokens (prompt)", int),
            ("bottleneck_size", "bottleneck size (adapter)", int)]  # fmt: skip
NUMBERS = MAIN + METHOD + ADVANCED
TEXTS = ["target_modules", "prompt_init"]
CHOICES = {"schedule": ("linear", "cosine", "constant"), "quant": ("nf4", "fp4", "int8")}
# the method flags' defaults are the config dataclasses' (as `slimtune train` builds them)
_FIELDS = {(cls.__name__, f.name): f.default
           for cls in (LoraConfig, PromptTuningConfig, BottleneckConfig)
           for f in dataclasses.fields(cls)}  # fmt: skip
METHOD_DEFAULTS = {"rank": _FIELDS["LoraConfig", "r"], "alpha": _FIELDS["LoraConfig", "lora_alpha"],
                   "dropout": _FIELDS["LoraConfig", "lora_dropout"],
                   "num_virtual_tokens": _FIELDS["PromptTuningConfig", "num_virtual_tokens"],
                   "bottleneck_size": _FIELDS["BottleneckConfig", "bottleneck_size"]}  # fmt: skip
# a config field's error -> the flag the user set
FLAG_OF = {"LoraConfig.r": "--rank", "LoraConfig.lora_alpha": "--alpha",
           "LoraConfig.lora_dropout": "--dropout",
           "PromptTuningConfig.num_virtual_tokens": "--num-virtual-tokens",
           "BottleneckConfig.bottleneck_size": "--bottleneck-size"}  # fmt: skip


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def default_of(key: str) -> Any:
    return TRAIN_DEFAULTS.get(key, METHOD_DEFAULTS.get(key))


def as_flag_error(exc: SlimtuneError) -> SlimtuneError:
    """'TrainConfig.lr=2.0 is not accepted: …' -> '--lr 2.0 is not accepted: …'."""
    found = re.match(r"(\w+)\.(\w+)=(.*?) is not accepted", str(exc))
    if not found:
        return exc
    cls, key, value = found.groups()
    name = FLAG_OF.get(f"{cls}.{key}", flag(key))
    return SlimtuneError(f"{name} {value} is not accepted{str(exc)[found.end() :]}")


def numbers(form: dict[str, Any]) -> dict[str, Any]:
    """The number fields that differ from the command line's defaults, as ints or floats."""
    out = {}
    for key, _, kind in NUMBERS:
        value = form.get(key)
        if value is None or value == "" or value == default_of(key):
            continue
        if kind is int and float(value) != int(float(value)):
            raise SlimtuneError(f"{flag(key)} {value} is not accepted: an integer")
        out[key] = kind(value)
    return out


def check_method(method: str, given: dict[str, Any]) -> None:
    """Build the method's config from the fields, as `slimtune train` will."""
    if method not in method_names():
        raise SlimtuneError(f"--method {method!r}: one of {', '.join(method_names())}")
    try:
        if method in ("lora", "qlora", "dora"):
            keys = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
            LoraConfig(**{keys[k]: given[k] for k in keys if k in given})
        elif method == "prompt" and "num_virtual_tokens" in given:
            PromptTuningConfig(num_virtual_tokens=given["num_virtual_tokens"])
        elif method == "adapter" and "bottleneck_size" in given:
            BottleneckConfig(bottleneck_size=given["bottleneck_size"])
    except SlimtuneError as exc:
        raise as_flag_error(exc) from None


def shown(root: Root, path: Path) -> str:
    """A path as the command line shows it: relative to the root (where the child runs)."""
    return root.relative(path) if path.is_relative_to(root.path) else str(path)


def train_command(root: Root, form: dict[str, Any]) -> tuple[list[str], Path]:
    """(the `slimtune train` arguments, the run directory), every check done first."""
    from slimtune.models import resolve_model_path
    from slimtune.training.loop import check_run_dir
    from slimtune.training.readers import read_source

    model = root.model(form.get("model", ""))
    resolve_model_path(model)
    data = root.data(form.get("data", ""))
    if data.suffix != ".txt":
        read_source(data)
    eval_data = root.data(form["eval_data"], "eval data") if form.get("eval_data") else None
    out = root.resolve(form.get("out", ""), "run directory")
    check_run_dir(out, resume=False, overwrite=bool(form.get("overwrite")))
    method = form.get("method") or "lora"
    given = numbers(form)
    try:
        TrainConfig(**{k: v for k, v in given.items() if k in TRAIN_DEFAULTS})
    except SlimtuneError as exc:
        raise as_flag_error(exc) from None
    check_method(method, given)
    args = ["train", "--model", shown(root, Path(model)) if Path(model).is_absolute() else model,
            "--data", shown(root, data)]  # fmt: skip
    if eval_data is not None:
        args += ["--eval-data", shown(root, eval_data)]
    args += ["--method", method, "--out", shown(root, out)]
    for key, _, _ in NUMBERS:
        if key in given:
            args += [flag(key), str(given[key])]
    for key in TEXTS:
        if (form.get(key) or "").strip():
            args += [flag(key), form[key].strip()]
    for key, allowed in CHOICES.items():
        if form.get(key):
            if form[key] not in allowed:
                raise SlimtuneError(f"{flag(key)} {form[key]!r}: one of {', '.join(allowed)}")
            args += [flag(key), form[key]]
    if form.get("overwrite"):
        args.append("--overwrite")
    return args, out


def as_yaml(args: list[str]) -> str:
    """The same options as a --config file (flags as keys, --overwrite left to the flag)."""
    import yaml

    options: dict[str, Any] = {}
    pairs = iter(args[1:])
    for name in pairs:
        if name == "--overwrite":
            continue
        value: Any = next(pairs)
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                continue
        options[name[2:].replace("-", "_")] = value
    return yaml.safe_dump(options, sort_keys=False)


def resume_command(root: Root, run_text: str) -> tuple[list[str], Path]:
    """`slimtune train --out RUN --resume`, refused when RUN has no checkpoint."""
    out = root.resolve(run_text, "run directory")
    if not (out / "config.yaml").is_file():
        raise SlimtuneError(f"run directory {run_text!r} has no config.yaml: not a run")
    if (out / "summary.json").is_file():
        raise SlimtuneError(f"run {run_text!r} is finished: nothing to resume")
    if not checkpoint_steps(out):
        raise SlimtuneError(
            f"run {run_text!r} stopped before its first checkpoint: start it again "
            "(or checkpoint more often)"
        )
    return ["train", "--out", shown(root, out), "--resume"], out

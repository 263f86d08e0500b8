"""The other methods by name, for `slimtune train --method …` (see recipes.py):

dora     LoRA with use_dora=True (PEFT's LoRA file plus lora_magnitude_vector)
ia3      IA³ vectors on keys, values and the MLP's down projection (PEFT's IA3 file)
prompt   prompt tuning: --num-virtual-tokens N soft-prompt vectors, --prompt-init TEXT
adapter  Houlsby bottleneck adapters of width --bottleneck-size after attention and MLP
full     every parameter trains; RUN/adapter is a full transformers directory (safetensors)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from slimtune.config import BottleneckConfig, IA3Config, PromptTuningConfig
from slimtune.errors import SlimtuneError
from slimtune.recipes import SaveFn, adapter_saver, lora_config, parse_targets, register_recipe


def prepare_dora(model: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, SaveFn]:
    from slimtune.inject import add_adapter

    config = dataclasses.replace(lora_config(options), use_dora=True)
    return add_adapter(model, config), adapter_saver(options.get("base_model"))


def prepare_ia3(model: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, SaveFn]:
    from slimtune.inject import add_adapter

    targets = parse_targets(options.get("target_modules"))
    if targets == "all-linear":
        raise SlimtuneError("--target-modules all-linear is not accepted for ia3: name the modules")
    config = IA3Config(target_modules=targets, feedforward_modules=[] if targets else None,
                       task_type="CAUSAL_LM")  # fmt: skip
    return add_adapter(model, config), adapter_saver(options.get("base_model"))


def prepare_prompt(model: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, SaveFn]:
    from slimtune.inject import add_adapter

    text, count = options.get("prompt_init"), options.get("num_virtual_tokens")
    tokenizer_path = None
    if options.get("model"):
        from slimtune.models import model_directory

        tokenizer_path = str(model_directory(options["model"]))
    config = PromptTuningConfig(
        num_virtual_tokens=20 if count is None else count,
        prompt_tuning_init="TEXT" if text else "RANDOM",
        prompt_tuning_init_text=text or None,
        tokenizer_name_or_path=tokenizer_path,
    )
    return add_adapter(model, config), adapter_saver(options.get("base_model"))


def prepare_adapter(model: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, SaveFn]:
    from slimtune.inject import add_adapter

    targets = parse_targets(options.get("target_modules"))
    config = BottleneckConfig(
        bottleneck_size=64
        if options.get("bottleneck_size") is None
        else options["bottleneck_size"],
        target_modules=None if targets == "all-linear" else targets,
    )
    return add_adapter(model, config), adapter_saver(options.get("base_model"))


def full_saver(model_spec: str | None) -> SaveFn:
    """save_fn writing a full transformers directory (safetensors) with the base's tokenizer."""

    def save(model: nn.Module, directory: Path) -> Path:
        from slimtune.io import write_atomic_dir
        from slimtune.models import load_tokenizer

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            if model_spec:
                load_tokenizer(model_spec).save_pretrained(tmp)

        write_atomic_dir(Path(directory), write)
        return Path(directory)

    return save


def prepare_full(model: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, SaveFn]:
    """Full fine-tuning: the baseline every other method is compared with."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model, full_saver(options.get("model"))


register_recipe("dora", prepare_dora)
register_recipe("ia3", prepare_ia3)
register_recipe("prompt", prepare_prompt)
register_recipe("adapter", prepare_adapter)
register_recipe("full", prepare_full)

"""Methods by name: how `--method X` prepares a model for training and saves what it trained.

    prepare(model, options) -> (model, save_fn)      save_fn(model, directory) writes RUN/adapter

`options` holds the method flags of the command line (rank, alpha, dropout,
target_modules, quant, base_model). A method registers itself with
`register_recipe("name", prepare)`; the trainer never needs to know which one ran.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError

SaveFn = Callable[[nn.Module, Path], Any]
Prepare = Callable[[nn.Module, dict[str, Any]], tuple[nn.Module, SaveFn]]
_RECIPES: dict[str, Prepare] = {}


def register_recipe(name: str, prepare: Prepare) -> None:
    _RECIPES[name] = prepare


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


def prepare_method(
    model: nn.Module, method: str, options: dict[str, Any]
) -> tuple[nn.Module, SaveFn]:
    """Add the method's trainable parameters to `model`; return (model, save_fn)."""
    if method not in _RECIPES:
        raise SlimtuneError(
            f"--method {method!r} is not available yet; available: {', '.join(recipe_names())}"
        )
    return _RECIPES[method](model, options)


def parse_targets(value: str | list[str] | None) -> list[str] | str | None:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']; 'all-linear' stays a string."""
    if value is None or isinstance(value, list):
        return value
    if value.strip() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise SlimtuneError(f"--target-modules {value!r}: give comma-separated module names")
    return names


def lora_config(options: dict[str, Any], default_targets: str | None = None) -> LoraConfig:
    rank = 8 if options.get("rank") is None else options["rank"]
    alpha = 2 * rank if options.get("alpha") is None else options["alpha"]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=options.get("dropout") or 0.0,
        target_modules=parse_targets(options.get("target_modules")) or default_targets,
        task_type="CAUSAL_LM",
    )


def adapter_saver(base: str | None, metadata: dict[str, str] | None = None) -> SaveFn:
    def save(model: nn.Module, directory: Path) -> Any:
        from slimtune.io import save_adapter

        return save_adapter(
            model, directory, base_model_name_or_path=base, metadata=metadata, overwrite=True
        )

    return save


def prepare_lora(model: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, SaveFn]:
    """LoRA on the given modules (PEFT's default for the model type when none are given)."""
    from slimtune.inject import add_adapter

    model = add_adapter(model, lora_config(options))
    return model, adapter_saver(options.get("base_model"))


def prepare_qlora(model: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, SaveFn]:
    """QLoRA: the frozen base quantized (NF4 with double quantization by default; the
    output layer kept), then LoRA on every linear layer unless told otherwise."""
    from slimtune.inject import add_adapter
    from slimtune.quant.linear import quant_metadata, quantize_model

    quantize_model(model, options.get("quant") or "nf4", skip=["lm_head"])
    model = add_adapter(model, lora_config(options, default_targets="all-linear"))
    metadata = {k: str(v) for k, v in quant_metadata(model).items()}
    return model, adapter_saver(options.get("base_model"), metadata)


register_recipe("lora", prepare_lora)
register_recipe("qlora", prepare_qlora)

import slimtune.method_recipes  # noqa: E402,F401  (registers dora, ia3, prompt, adapter, full)

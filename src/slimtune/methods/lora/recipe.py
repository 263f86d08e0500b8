"""`--method lora` and `--method qlora`: the LoraConfig the command line's flags describe."""

from __future__ import annotations

from typing import Any

from torch import nn

from slimtune.config import LoraConfig
from slimtune.methods.options import parse_targets
from slimtune.methods.table import add_adapter


def lora_config(options: dict[str, Any], default_targets: str | None = None) -> LoraConfig:
    """--rank and --alpha default to LoraConfig's (and PEFT's) r=8, lora_alpha=8."""
    given = {"r": options.get("rank"), "lora_alpha": options.get("alpha")}
    return LoraConfig(
        **{k: v for k, v in given.items() if v is not None},
        lora_dropout=options.get("dropout") or 0.0,
        target_modules=parse_targets(options.get("target_modules")) or default_targets,
        task_type="CAUSAL_LM",
    )


def prepare_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """LoRA on the given modules (PEFT's default for the model type when none are given)."""
    return add_adapter(model, lora_config(options))


def prepare_qlora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """QLoRA: the frozen base quantized (NF4 with double quantization by default; the
    output layer kept), then LoRA on every linear layer unless told otherwise."""
    from slimtune.quant.linear import quantization_of, quantize_model

    if quantization_of(model) is None:  # not already quantized while loading (models.py)
        quantize_model(model, options.get("quant") or "nf4", skip=["lm_head"])
    return add_adapter(model, lora_config(options, default_targets="all-linear"))

"""LoRA as a method: building LoraConfig adapters into a model.

    add_lora(model, config, name)
      for each target module (inject.find_targets, PEFT's matching):
          r, alpha  <- rank_pattern / alpha_pattern (first regex key matching the name's tail)
          Linear / Conv1D      -> LoraLinear
          name in enable_lora  -> LoraFusedLinear (only the chosen slices of a fused projection)
          Embedding            -> LoraEmbedding
      modules_to_save -> ModulesToSaveWrapper (PEFT adds "classifier", "score" for SEQ_CLS)
      freeze everything else; biases train as `bias` says ("none", "all", "lora_only")

The "lora" row of slimtune.methods.table names add_lora; the PEFT file format lives in
peft_format.py and combining adapters in combine.py.
"""

from __future__ import annotations

import re

from torch import nn

from slimtune.adapters.layers import (
    freeze_all,
    replace_module,
    wrap_modules_to_save,
)
from slimtune.adapters.targets import find_targets
from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError
from slimtune.methods.lora.layers import LoraEmbedding, LoraFusedLinear, LoraLayer, LoraLinear


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's get_pattern_key: the first key K with re.match(r"(.*\\.)?(K)$", name) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def fused_mask(config: LoraConfig, name: str) -> list[bool] | None:
    for key, mask in config.enable_lora.items():
        if name == key or name.endswith(f".{key}"):
            return list(mask)
    return None


def slice_sizes(model: nn.Module, out_features: int, k: int) -> list[int] | None:
    """Output sizes of a fused q/k/v projection under grouped-query attention (Phi-3 style):
    [heads·head_dim, kv_heads·head_dim, kv_heads·head_dim]; None means k equal slices."""
    cfg = getattr(model, "config", None)
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if k != 3 or not heads or not kv or heads == kv:
        return None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
    return sizes if sum(sizes) == out_features else None


def _new_layer(model: nn.Module, module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    mask = fused_mask(config, name)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    linear_like = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    linear_like = linear_like or (
        hasattr(module, "in_features") and hasattr(module, "dequantize_weight")
    )
    if not linear_like:
        raise SlimtuneError(
            f"target module {name} is a {type(module).__name__}; LoRA adapts Linear, Conv1D and Embedding layers"
        )
    if not mask:
        return LoraLinear(module)
    out_features = getattr(module, "out_features", None) or module.weight.shape[-1]
    return LoraFusedLinear(module, mask, slice_sizes(model, out_features, len(mask)))


def saved_module_names(config: LoraConfig) -> list[str] | None:
    """modules_to_save, with PEFT's additions for sequence classification."""
    names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        names += ["classifier", "score"]
    return names or None


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Wrap every target module of `config` in a LoRA layer and add adapter `adapter_name`."""
    for name in find_targets(model, config):
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoraLayer) else _new_layer(model, module, name, config)
        r = int(pattern_value(config.rank_pattern, name, config.r))
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer.add_adapter(
            adapter_name,
            r,
            alpha,
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init=config.init_lora_weights,
        )
        if layer is not module:
            replace_module(model, name, layer)
    wrap_modules_to_save(model, saved_module_names(config), adapter_name)
    freeze_all(model)
    _train_biases(model, config.bias)
    return model


def _train_biases(model: nn.Module, bias: str) -> None:
    if bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for module in model.modules():
            if (
                isinstance(module, LoraLayer)
                and getattr(module.base_layer, "bias", None) is not None
            ):
                module.base_layer.bias.requires_grad_(True)
